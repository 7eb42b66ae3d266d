"""The one config system: typed schemas (pydantic models), YAML recipes, dotted overrides.

A recipe is a YAML file whose keys follow a schema; `key.sub=value` overrides from the command
line are applied on top (values read as YAML, so `3`, `0.5`, `true`, `[en, de]` get their
types). An unknown or mistyped key is an error that names it and suggests the closest valid
one; every problem is reported in one line.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from voxtune.errors import InputError, echo, shorten

T = TypeVar("T", bound="Config")
MAX_PROBLEMS = 5  # problems a config error lists before "and N more"


class ConfigError(InputError):
    """A recipe or override that does not fit its schema."""


class Config(BaseModel):
    """Base of every schema: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def load_config(schema: type[T], source: str | os.PathLike | dict | None = None, overrides: Sequence[str] = ()) -> T:
    """Read `source` (a YAML path, a dict, or None for the defaults), apply `overrides`, validate.

    Raises:
        ConfigError: unreadable YAML, a bad override, or values that break the schema.
    """
    data = _read(source)
    for override in overrides:
        _apply_override(data, override)
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, schema, source)) from None


def dump_config(config: Config) -> str:
    """The config as YAML, every value resolved (what `--print-config` shows)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _read(source: str | os.PathLike | dict | None) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no such recipe: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, equals, raw = override.partition("=")
    if not equals or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: take it as a plain string
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: ValidationError, schema: type[Config], source: Any) -> str:
    where = f"{source}: " if isinstance(source, (str, os.PathLike)) else ""
    problems = []
    errors = error.errors()
    for item in errors[:MAX_PROBLEMS]:
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            hint = _closest(schema, item["loc"])
            problems.append(f"unknown key {shorten(location)}" + (f" (did you mean {hint}?)" if hint else ""))
        else:
            problems.append(f"{shorten(location)}: {item['msg']} (got {echo(item.get('input'))})")
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_PROBLEMS} more")
    return where + "; ".join(problems)


def _closest(schema: type[Config], loc: tuple) -> str | None:
    """The valid key nearest to the unknown last part of `loc`, as a dotted path."""
    model: Any = schema
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return ".".join([*map(str, loc[:-1]), match[0]]) if match else None
