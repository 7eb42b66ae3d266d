"""The prompts voxtune's tasks use, shared by training data and inference so they always agree."""

from __future__ import annotations

from typing import Any

from voxtune.model.tokens import tag


def transcribe_messages(audio: Any, language: str | None = None) -> list[dict]:
    """A conversation asking for the words spoken in `audio` (optionally in a known `language`)."""
    instruction = tag("task", "transcribe") + (tag("lang", language) if language else "")
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": instruction}]}]
