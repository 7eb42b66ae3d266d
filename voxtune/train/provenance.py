"""`training.json`, saved with every model a run exports: how it was made (the recipe and data
recipe, the seed, the voxtune version, steps, training time, the machine, the last evaluation)
and, for a model trained on from another, that model's own record."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch

from voxtune.train.recipe import TrainRecipe

TRAINING_RECORD = "training.json"


def training_record(recipe: TrainRecipe, *, steps: int, seconds: float, evaluations: list[dict]) -> dict[str, Any]:
    """The record of a run of `recipe` that trained `steps` steps in `seconds`, its evaluation
    records (the last one is kept)."""
    from voxtune import __version__
    from voxtune.config import load_config

    data_recipe = None
    if recipe.data.synth is not None:
        from voxtune.data.synth import SynthRecipe

        data_recipe = load_config(SynthRecipe, recipe.data.synth).model_dump(mode="json")
    # A model trained on from another (model.load, model.init_encoder) carries that one's
    # record along, so the exported folder tells the whole chain.
    base = recipe.model.load or recipe.model.init_encoder
    return {
        "voxtune_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "data_recipe": data_recipe,
        "seed": recipe.train.seed,
        "steps": steps,
        "training_seconds": round(seconds, 1),
        "machine": machine(),
        "last_evaluation": evaluations[-1] if evaluations else None,
        "base": base_record(base) if base is not None else None,
    }


def base_record(name: str) -> dict[str, Any]:
    """What the record says of the model a run started from: its name and, when it was trained
    by voxtune, its own training record."""
    from voxtune.model.checkpoint import resolve

    record = resolve(name) / TRAINING_RECORD
    return {"model": name, "training": json.loads(record.read_text()) if record.is_file() else None}


def machine() -> str:
    """The hardware a run trains on, in words."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPUs)"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
