"""Tiny models shared by the model tests (built once per session: they are read-only there)."""

from __future__ import annotations

import numpy as np
import pytest

from voxtune.audio import Audio
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


def clip(seconds: float, seed: int = 0) -> Audio:
    """A 16 kHz noise-and-tone clip of `seconds`."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    samples = 0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    return Audio(samples.astype(np.float32), 16000)


@pytest.fixture
def make_clip():
    """The `clip` helper as a fixture."""
    return clip
