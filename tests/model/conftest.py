"""Tiny models shared by the model tests (built once per session: they are read-only there)."""

from __future__ import annotations

import pytest

from voxtune.model import tiny


@pytest.fixture(scope="session")
def tiny_models():
    """`tiny_models(lm, encoder)` -> a cached tiny SpeechLM (do not train or modify it)."""
    cache = {}

    def get(lm: str = "llama", encoder: str = "streaming"):
        if (lm, encoder) not in cache:
            cache[lm, encoder] = tiny(lm, encoder, seed=0)
        return cache[lm, encoder]

    return get
