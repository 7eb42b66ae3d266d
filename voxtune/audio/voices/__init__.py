"""Voices: text to speech, rendered sentence by sentence so that a server can stream it.

The default backend speaks English in Piper's natural voice (`PiperBackend`) and every other
language in eSpeak NG (`EspeakBackend`); others plug in through `VoiceBackend`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from voxtune.audio.audio import Audio
from voxtune.audio.voices.base import (
    DEFAULT_LANGUAGE,
    DEFAULT_VOICE,
    MAX_TEXT_CHARS,
    OPENAI_VOICES,
    STYLES,
    LanguageInfo,
    Style,
    UnknownLanguageError,
    UnknownStyleError,
    UnknownVoiceError,
    VoiceBackend,
    VoiceError,
    VoiceInfo,
    split_sentences,
)
from voxtune.audio.voices.default import DefaultBackend
from voxtune.audio.voices.espeak import EspeakBackend
from voxtune.audio.voices.piper import PiperBackend

_DEFAULT_BACKEND = DefaultBackend()  # views of the engines; each engine opens on first use


def default_backend() -> DefaultBackend:
    """The built-in backend: Piper for English, eSpeak NG for the rest."""
    return _DEFAULT_BACKEND


def render(
    text: str,
    lang: str = DEFAULT_LANGUAGE,
    voice: str = DEFAULT_VOICE,
    style: str | Style = "neutral",
    speed: float = 1.0,
    *,
    backend: VoiceBackend | None = None,
) -> Iterator[Audio]:
    """Speak `text`: an iterator of `Audio` chunks, one per sentence. Bad arguments raise at once."""
    return (backend or default_backend()).render(text, lang, voice, style, speed)


def synthesize(
    text: str,
    lang: str = DEFAULT_LANGUAGE,
    voice: str = DEFAULT_VOICE,
    style: str | Style = "neutral",
    speed: float = 1.0,
    *,
    backend: VoiceBackend | None = None,
) -> Audio:
    """Speak `text` and return the whole utterance as one `Audio`."""
    chunks = list(render(text, lang, voice, style, speed, backend=backend))
    return Audio(np.concatenate([c.samples for c in chunks]), chunks[0].sample_rate)


def list_voices(backend: VoiceBackend | None = None) -> list[VoiceInfo]:
    """Every voice name the backend accepts (OpenAI names first)."""
    return (backend or default_backend()).list_voices()


def list_languages(backend: VoiceBackend | None = None) -> list[LanguageInfo]:
    """Every language code the backend speaks."""
    return (backend or default_backend()).list_languages()


__all__ = [
    "DEFAULT_LANGUAGE",
    "DEFAULT_VOICE",
    "MAX_TEXT_CHARS",
    "OPENAI_VOICES",
    "STYLES",
    "DefaultBackend",
    "EspeakBackend",
    "LanguageInfo",
    "PiperBackend",
    "Style",
    "UnknownLanguageError",
    "UnknownStyleError",
    "UnknownVoiceError",
    "VoiceBackend",
    "VoiceError",
    "VoiceInfo",
    "default_backend",
    "list_languages",
    "list_voices",
    "render",
    "split_sentences",
    "synthesize",
]
