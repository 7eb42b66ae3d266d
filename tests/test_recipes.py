"""Every recipe shipped in recipes/ loads and validates against its schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxtune.config import load_config
from voxtune.data.synth import SynthRecipe
from voxtune.train.recipe import TrainRecipe

RECIPES = Path(__file__).parents[1] / "recipes"
# recipes/<folder>/*.yaml -> the schema it follows; recipes/*.yaml are training recipes.
SCHEMAS = {"data": SynthRecipe, ".": TrainRecipe}


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipe_is_valid(path):
    parts = path.relative_to(RECIPES).parts
    folder = parts[0] if len(parts) > 1 else "."
    assert folder in SCHEMAS, f"no schema registered for recipes/{folder}/"
    load_config(SCHEMAS[folder], path)


def test_there_are_recipes():
    assert list(RECIPES.rglob("*.yaml"))
