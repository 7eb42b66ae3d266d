"""One labelled speech example, whatever it was read from (manifest, folder, dataset, synthesiser).

Every field but `audio` is optional: a transcript corpus fills `text`, a language-ID corpus
`language` and `segments`, an instruction corpus `instruction` and `answer`, and so on. Task
templates (voxtune.data.tasks) turn an example into a conversation for `SpeechLM`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from voxtune.audio import Audio


@dataclass(frozen=True)
class Segment:
    """A stretch of the audio in one language: times in seconds from the clip's start."""

    start: float
    end: float
    language: str
    text: str = ""


@dataclass
class SpeechExample:
    """A clip and what is known about it.

    Attributes:
        audio: a path to an audio file, encoded bytes, or decoded `Audio`.
        text: the words spoken (transcript).
        language: the language spoken (a code such as "en"); for a code-switched clip, the first.
        style: how it is said: neutral, happy, sad, angry, calm, excited, whisper.
        intent: what the speaker wants: question, command, statement.
        segments: languages with times, for code-switched clips.
        instruction: a written request sent as text with the audio, which is what it is about
            ("add three to the number you hear"); a spoken request is the audio itself, its
            words in `text`.
        answer: the expected reply (to the instruction, or to the spoken request).
        speaker: who speaks (a voice or speaker id), for splits disjoint by speaker.
        meta: anything else the source gave (kept, not interpreted; but `no_speech: true`
            marks a clip in which nobody speaks: its transcript is nothing at all, and it has no text).
    """

    audio: str | Path | bytes | Audio = field(repr=False)  # bytes would bury everything else
    text: str | None = None
    language: str | None = None
    style: str | None = None
    intent: str | None = None
    segments: list[Segment] | None = None
    instruction: str | None = None
    answer: str | None = None
    speaker: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self, audio: str) -> dict[str, Any]:
        """The manifest record of this example, with `audio` written as given (a path string)."""
        record = {k: v for k, v in asdict(self).items() if v not in (None, {}, []) and k != "audio"}
        return {"audio": audio, **record}
