"""Replies spoken back through the built-in voice, in the reply's language and a fitting style.

The language is the reply's own language tag when it has one (a transcript does), else the
language the model hears in the user's last clip: the model answers in the language it was
asked in. The style follows how the user sounded, as a considerate speaker would answer: in
kind to a happy or calm speaker, calm to an angry or sad one, in a whisper to a whisper.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from voxtune.audio import Audio, voices
from voxtune.audio.voices import split_sentences
from voxtune.audio.voices.base import DEFAULT_LANGUAGE
from voxtune.model import prompts
from voxtune.tags import strip_tags, tag_values

if TYPE_CHECKING:
    from voxtune.model import SpeechLM

CLAUSE_CHARS = 80  # a sentence this long is spoken clause by clause as it streams
# The end of a text that may be a tag still being written: `<|`, `<|lang`, `<|lang:e`...
_PARTIAL_TAG = re.compile(r"<\|[a-z_]*(:[^|<>\s]*)?$")
# The user's style (as the model hears it) -> the style of the spoken reply.
REPLY_STYLE = {
    "neutral": "neutral",
    "happy": "happy",
    "excited": "happy",
    "calm": "calm",
    "sad": "calm",
    "angry": "calm",
    "whisper": "whisper",
}


@dataclass
class SpokenReply:
    """A reply as text (tags removed), the language and style it is spoken in, and its audio."""

    text: str
    language: str
    style: str
    audio: Audio | None


def _last_clip(messages: Sequence[dict]) -> Any:
    for message in reversed(messages):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, list):
            for part in reversed(content):
                if part.get("type") == "audio":
                    return part["audio"]
                if part.get("type") == "input_audio":  # OpenAI's base64 part: the data loads as it is
                    return part["input_audio"]["data"]
    return None


def reply_voice(model: SpeechLM, messages: Sequence[dict], reply: str) -> tuple[str, str]:
    """(language, style) to speak `reply` to `messages` in; see the module docstring."""
    clip = _last_clip(messages) if model.knows_task_tags else None
    if clip is not None:  # asked about twice: encode it once
        clip = model.encode_audio(clip)
    heard_language = heard_style = ""
    if not tag_values(reply, "lang") and clip is not None:
        heard_language = model.generate(prompts.language_messages(clip), max_new_tokens=4, temperature=0)
    if clip is not None:
        heard_style = model.generate(prompts.describe_messages(clip), max_new_tokens=4, temperature=0)
    return choose_voice(reply, heard_language, heard_style)


def choose_voice(reply: str, heard_language: str = "", heard_style: str = "") -> tuple[str, str]:
    """(language, style) for `reply`: its own language tag, else the `<|lang:..|>` tag of
    `heard_language` (the model's answer to `prompts.language_messages`), else English; the
    style that answers the `<|style:..|>` of `heard_style` (`prompts.describe_messages`)."""
    languages = tag_values(reply, "lang") or tag_values(heard_language, "lang")
    heard = tag_values(heard_style, "style")
    return languages[0] if languages else DEFAULT_LANGUAGE, REPLY_STYLE.get(heard[0] if heard else "neutral", "neutral")


def speak_reply(
    model: SpeechLM,
    messages: Sequence[dict],
    reply: str | None = None,
    *,
    voice: str = voices.DEFAULT_VOICE,
    **sampling: Any,
) -> SpokenReply:
    """Speak the reply to `messages` (`reply`, or generated with `sampling` when None); audio is
    None when the reply has no words. A language the voice cannot speak falls back to English."""
    if reply is None:
        reply = model.generate(messages, **sampling)
    language, style = reply_voice(model, messages, reply)
    text = strip_tags(reply)
    if not text:
        return SpokenReply(text, language, style, None)
    audio, language = render_reply(text, language, voice, style)
    return SpokenReply(text, language, style, audio)


def render_reply(
    text: str, language: str, voice: str = voices.DEFAULT_VOICE, style: str = "neutral"
) -> tuple[Audio, str]:
    """`text` spoken by `voice` in `language` and `style`, and the language it was spoken in
    (English when the voice cannot speak `language`)."""
    try:
        return voices.synthesize(text, language, voice, style), language
    except voices.UnknownLanguageError:
        return voices.synthesize(text, DEFAULT_LANGUAGE, voice, style), DEFAULT_LANGUAGE


def ready_to_speak(text: str) -> int:
    """How much of `text` (speech not yet rendered) can be spoken now: its finished sentences
    (the last sentence may still grow), or in a long sentence its clauses up to the last
    comma, so that the first audio does not wait for the sentence's end. 0: nothing yet."""
    sentences = split_sentences(text)
    if len(sentences) > 1:
        return text.rfind(sentences[-1])  # everything before the unfinished last sentence
    comma = text.rfind(", ")
    return comma + 1 if len(text) >= CLAUSE_CHARS and comma > 0 else 0


class SpokenText:
    """A reply spoken while it streams: feed it the model's raw text piece by piece; each call
    says what is new in the transcript (tags removed) and what can be spoken now (finished
    sentences, or the clauses of a long one), so that speech follows the text sentence by
    sentence. `finish` takes the whole reply and gives what is left."""

    def __init__(self) -> None:
        self.raw = ""  # the model's text so far, tags included
        self.said = ""  # its transcript so far
        self.spoken = 0  # characters of `said` already handed out to speak

    def feed(self, piece: str) -> tuple[str, str]:
        """Add `piece` of the raw reply: (transcript delta, text to speak now), either may be ''."""
        self.raw += piece
        delta = self._catch_up(self.raw)
        ready = ready_to_speak(self.said[self.spoken :])
        speak = self.said[self.spoken : self.spoken + ready].strip()
        self.spoken += ready
        return delta, speak

    def finish(self, reply: str) -> tuple[str, str]:
        """The whole raw `reply` (it may differ from the pieces, e.g. without a tool call):
        (the transcript's last delta, the rest to speak)."""
        delta = self._catch_up(reply, whole=True)
        rest = self.said[self.spoken :].strip()
        self.spoken = len(self.said)
        return delta, rest

    def _catch_up(self, raw: str, *, whole: bool = False) -> str:
        # A tag being written (`<|lang:e` before its `|>`) would look like text: it waits,
        # unless the reply is whole (then it was text).
        partial = None if whole else _PARTIAL_TAG.search(raw)
        clean = strip_tags(raw[: partial.start()] if partial else raw)
        if len(clean) > len(self.said) and clean.startswith(self.said):
            delta, self.said = clean[len(self.said) :], clean
            return delta
        return ""


class ReplySpeaker:
    """Speaks a reply to `messages` piece by piece as it streams (with `SpokenText`), in one
    language and style, chosen at the first piece as `speak_reply` chooses them; `reply()` is
    the whole of it as `speak_reply` gives it."""

    def __init__(self, model: SpeechLM, messages: Sequence[dict], voice: str = voices.DEFAULT_VOICE) -> None:
        self.model, self.messages, self.voice = model, messages, voice
        self.choice: tuple[str, str] | None = None
        self.pieces: list[Audio] = []

    def say(self, text: str, reply_so_far: str) -> Audio:
        """`text` (a finished piece of the reply whose raw text so far is `reply_so_far`) spoken."""
        if self.choice is None:
            self.choice = reply_voice(self.model, self.messages, reply_so_far)
        language, style = self.choice
        audio, language = render_reply(text, language, self.voice, style)
        self.choice = (language, style)  # a fallback to English holds for the rest
        self.pieces.append(audio)
        return audio

    def reply(self, text: str) -> SpokenReply:
        """The spoken reply whose transcript is `text`: every piece said, end to end."""
        language, style = self.choice or (DEFAULT_LANGUAGE, "neutral")
        if not self.pieces:
            return SpokenReply(text, language, style, None)
        rate = self.pieces[0].sample_rate
        samples = np.concatenate([piece.resample(rate).samples for piece in self.pieces])
        return SpokenReply(text, language, style, Audio(samples, rate))
