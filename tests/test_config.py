"""The typed config system: YAML + dotted overrides, one-line errors with suggestions."""

from __future__ import annotations

from typing import Literal

import pytest
import yaml

from voxtune.config import Config, ConfigError, dump_config, load_config


class Optim(Config):
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


class Recipe(Config):
    name: str = "run"
    steps: int = 10
    languages: list[str] = ["en"]
    mode: Literal["lora", "full"] = "lora"
    optim: Optim = Optim()


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: demo\noptim:\n  lr: 0.01\nlanguages: [en, de]\n")
    config = load_config(Recipe, path, ["steps=25", "optim.betas=[0.8, 0.9]", "mode=full", "name=x=y"])
    assert config.name == "x=y" and config.steps == 25 and config.mode == "full"
    assert config.languages == ["en", "de"] and config.optim.lr == 0.01 and config.optim.betas == (0.8, 0.9)
    assert load_config(Recipe, yaml.safe_load(dump_config(config))) == config  # the dump reads back


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["optim.lrr=1"], "unknown key optim.lrr (did you mean optim.lr?)"),
        (["stepz=3"], "unknown key stepz (did you mean steps?)"),
        (["steps=many"], "steps: Input should be a valid integer"),
        (["mode=qlora"], "mode: Input should be 'lora' or 'full'"),
        (["steps"], "not of the form key.sub=value"),
        (["name.first=a"], "name: Input should be a valid string"),
    ],
)
def test_bad_overrides_are_one_line_and_helpful(overrides, words):
    with pytest.raises(ConfigError) as raised:
        load_config(Recipe, None, overrides)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe"):
        load_config(Recipe, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(Recipe, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Recipe, tmp_path / "list.yaml")


def test_an_override_cannot_descend_into_a_value(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: demo\n")
    with pytest.raises(ConfigError, match="name is a value, not a section"):
        load_config(Recipe, path, ["name.first=a"])
