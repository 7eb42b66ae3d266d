"""The prompts of voxtune's tasks, shared by training data and inference so they always agree.

Each function returns the conversation that asks for one task about a clip; training appends
the expected assistant reply (voxtune.data.tasks), inference generates it.
"""

from __future__ import annotations

from typing import Any

from voxtune.model.processor import MessageError
from voxtune.tags import LANGUAGES, tag


def _user(audio: Any, text: str, *, text_first: bool = False) -> list[dict]:
    parts = [{"type": "audio", "audio": audio}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts[::-1] if text_first else parts}]


def transcribe_messages(audio: Any, language: str | None = None) -> list[dict]:
    """Ask for the words spoken in `audio` (optionally in a known `language`, one of
    `voxtune.tags.LANGUAGES`)."""
    if language is not None and language not in LANGUAGES:
        raise MessageError(f"no language tag for {language!r} (known: {', '.join(LANGUAGES)})")
    return _user(audio, tag("task", "transcribe") + (tag("lang", language) if language else ""))


def language_messages(audio: Any) -> list[dict]:
    """Ask which language `audio` is in."""
    return _user(audio, tag("task", "language"))


def segments_messages(audio: Any) -> list[dict]:
    """Ask for the languages of `audio` with their times (code-switched speech)."""
    return _user(audio, tag("task", "segments"))


def describe_messages(audio: Any) -> list[dict]:
    """Ask how the speaker sounds and what they want."""
    return _user(audio, tag("task", "describe"))


def answer_messages(audio: Any, instruction: str | None = None) -> list[dict]:
    """Ask for the reply to a spoken instruction, or to a written `instruction` about the audio."""
    if instruction:
        return _user(audio, instruction, text_first=True)
    return _user(audio, tag("task", "answer"))


def ask_spoken_requests(messages: list[dict]) -> list[dict]:
    """`messages` with a last user turn of audio alone marked as a spoken request to answer (the
    answer task's tag after the clips, as the model was taught); other conversations as they are."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return messages
    content = last.get("content")
    if not isinstance(content, list) or not content:
        return messages
    if all(isinstance(part, dict) and part.get("type") in ("audio", "input_audio") for part in content):
        return [*messages[:-1], {**last, "content": [*content, {"type": "text", "text": tag("task", "answer")}]}]
    return messages
