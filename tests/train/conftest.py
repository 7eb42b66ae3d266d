"""A tiny-model recipe shared by the training tests (on the session's `corpus`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxtune.config import load_config
from voxtune.train.recipe import TrainRecipe


@pytest.fixture(scope="session")
def tiny_recipe(corpus):
    """`tiny_recipe(output_dir, *overrides)`: a 6-step run of a tiny model on `corpus`."""

    def make(output_dir: Path, *overrides: str) -> TrainRecipe:
        base = {
            "model": {"tiny": {"lm": "llama", "encoder": "streaming", "hidden": 32}},
            "data": {
                "train": [str(corpus / "train.jsonl")],
                "valid": [str(corpus / "test.jsonl")],
                "mixture": {"transcribe": 1, "describe": 1},
            },
            "train": {"max_steps": 6, "max_tokens": 1500, "log_every": 100},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "eval": {"every": 100, "limit": 2, "max_new_tokens": 4},
            "output": {"dir": str(output_dir), "save_every": 100},
        }
        return load_config(TrainRecipe, base, list(overrides))

    return make
