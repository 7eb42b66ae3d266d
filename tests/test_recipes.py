"""Every recipe shipped in recipes/ loads and validates against its schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxtune.config import load_config
from voxtune.data.synth import SynthRecipe

RECIPES = Path(__file__).parents[1] / "recipes"
SCHEMAS = {"data": SynthRecipe}  # recipes/<folder>/*.yaml -> the schema it follows


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipe_is_valid(path):
    folder = path.relative_to(RECIPES).parts[0]
    assert folder in SCHEMAS, f"no schema registered for recipes/{folder}/"
    load_config(SCHEMAS[folder], path)


def test_there_are_recipes():
    assert list(RECIPES.rglob("*.yaml"))
