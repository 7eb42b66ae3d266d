"""Every recipe shipped in recipes/ loads and validates against its schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxtune.config import load_config
from voxtune.data.synth import SynthRecipe
from voxtune.train.recipe import TrainRecipe

RECIPES = Path(__file__).parents[1] / "recipes"


def schema_of(path: Path) -> type:
    """Data recipes live in recipes/data/ or are named data.yaml beside a model's training
    recipe (recipes/voxtune-tiny-v3/data.yaml); every other recipe trains."""
    relative = path.relative_to(RECIPES)
    return SynthRecipe if relative.parts[0] == "data" or path.name == "data.yaml" else TrainRecipe


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipe_is_valid(path):
    recipe = load_config(schema_of(path), path)
    if isinstance(recipe, TrainRecipe) and recipe.data.synth:  # the data recipe it names is shipped too
        assert (RECIPES.parent / recipe.data.synth).is_file()


def test_there_are_recipes():
    assert list(RECIPES.rglob("*.yaml"))
