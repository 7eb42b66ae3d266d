"""What every voice backend offers: voices, languages, styles, and sentence-by-sentence rendering."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from voxtune import tags
from voxtune.audio.audio import Audio
from voxtune.errors import InputError

# The voice names of OpenAI's speech APIs; every backend maps each to a distinct voice of its own.
OPENAI_VOICES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "marin",
    "cedar",
    "nova",
    "onyx",
    "sage",
    "shimmer",
    "verse",
)
MIN_SPEED, MAX_SPEED = 0.25, 4.0  # the range /v1/audio/speech accepts
MAX_TEXT_CHARS = 50_000  # about an hour of speech; longer texts should be split by the caller
DEFAULT_VOICE = "alloy"
DEFAULT_LANGUAGE = "en"


class VoiceError(InputError):
    """A voice request that cannot be met."""


class UnknownVoiceError(VoiceError):
    """No voice by that name."""


class UnknownLanguageError(VoiceError):
    """The backend cannot speak that language."""


class UnknownStyleError(VoiceError):
    """No style by that name."""


@dataclass(frozen=True)
class Style:
    """How to speak, relative to a voice's own neutral delivery.

    pitch and pitch_range are 0-100 with 50 the voice's neutral; rate is words per minute at
    speed 1; volume is a percentage; pause is extra silence between words in milliseconds.
    """

    pitch: int = 50
    pitch_range: int = 50
    rate: int = 175
    volume: int = 100
    pause: int = 0
    whisper: bool = False


# Chosen so that a listener hears each one: happy/excited are higher, wider and faster;
# sad/calm lower, flatter and slower; angry louder and clipped; whisper breathy and soft.
_SOUND = {
    "neutral": Style(),
    "happy": Style(pitch=70, pitch_range=85, rate=195, volume=115),
    "sad": Style(pitch=28, pitch_range=15, rate=135, volume=75, pause=30),
    "angry": Style(pitch=58, pitch_range=75, rate=200, volume=160),
    "calm": Style(pitch=40, pitch_range=30, rate=150, volume=85, pause=15),
    "excited": Style(pitch=80, pitch_range=100, rate=220, volume=135),
    "whisper": Style(pitch=45, pitch_range=40, rate=160, volume=90, whisper=True),
}
# The styles are voxtune's one list (`voxtune.tags.STYLES`); a style with no sound fails here.
STYLES: dict[str, Style] = {name: _SOUND[name] for name in tags.STYLES}


@dataclass(frozen=True)
class VoiceInfo:
    """One voice a backend offers: `name` is what callers pass; `backend_voice` what it maps to."""

    name: str
    backend_voice: str
    gender: str


@dataclass(frozen=True)
class LanguageInfo:
    """One language a backend speaks: `code` (BCP-47-like, lower case) and its `name`."""

    code: str
    name: str


class VoiceBackend(Protocol):
    """A text-to-speech engine that renders text sentence by sentence."""

    def list_voices(self) -> list[VoiceInfo]:
        """Every voice name `render` accepts, the OpenAI names first."""
        ...

    def list_languages(self) -> list[LanguageInfo]:
        """Every language code `render` accepts."""
        ...

    def render(self, text: str, lang: str, voice: str, style: str | Style, speed: float) -> Iterator[Audio]:
        """Check every argument (raising a `VoiceError` at the call), then return an iterator
        that renders one `Audio` per sentence of `text` as it is consumed."""
        ...


def get_style(name: str | Style) -> Style:
    """Return the named style (a `Style` is returned as is), or raise `UnknownStyleError`."""
    if isinstance(name, Style):
        return name
    try:
        return STYLES[name.lower()]
    except KeyError:
        raise UnknownStyleError(f"unknown style {name!r} (choose from {', '.join(STYLES)})") from None


def check_text(text: str) -> str:
    """Return `text` if it can be spoken: non-empty, valid Unicode, at most `MAX_TEXT_CHARS`."""
    if not text or not text.strip():
        raise VoiceError("nothing to speak: the text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise VoiceError(f"text is {len(text)} characters long, over the {MAX_TEXT_CHARS} limit; split it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from undecodable command-line bytes
        raise VoiceError("text is not valid Unicode (it holds undecodable bytes)") from None
    return text


def check_speed(speed: float) -> float:
    """Return `speed` if it is within the accepted range, else raise `VoiceError`."""
    if not MIN_SPEED <= speed <= MAX_SPEED:  # also false for NaN
        raise VoiceError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
    return speed


# A sentence ends at terminal punctuation (Latin, CJK, Arabic, Devanagari) followed by space or
# the end, or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?;…。！？；؟।])\s+|(?<=[。！？])|\n+")


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences to render one at a time (so the first can stream early)."""
    return [part.strip() for part in _SENTENCE_END.split(text) if part and part.strip()]
