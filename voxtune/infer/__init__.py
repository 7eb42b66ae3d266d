"""Running a speech LM for users: batched generation, the audio store, replies spoken back."""

from voxtune.infer.audio_store import AudioNotFoundError, AudioStore, StoredAudio
from voxtune.infer.engine import Completion, Engine, Generation
from voxtune.infer.runtime import Runtime, Transcript
from voxtune.infer.spoken_reply import (
    REPLY_STYLE,
    ReplySpeaker,
    SpokenReply,
    SpokenText,
    choose_voice,
    render_reply,
    reply_voice,
    speak_reply,
)

__all__ = [
    "REPLY_STYLE",
    "AudioNotFoundError",
    "AudioStore",
    "Completion",
    "Engine",
    "Generation",
    "ReplySpeaker",
    "Runtime",
    "SpokenReply",
    "SpokenText",
    "StoredAudio",
    "Transcript",
    "choose_voice",
    "render_reply",
    "reply_voice",
    "speak_reply",
]
