"""Evaluation suites: which clips, rendered how, under which conditions.

A suite names a corpus plan (a `SynthRecipe`) and the split of it to score. The plan is the
whole corpus's, so the split holds voices and sentences that the plan's other splits (what a
model is trained on) never have; only that split is rendered. The rendered set is cached and
fingerprinted (SHA-256 of its manifest and audio): the same suite version gives the same bytes,
and a report names the fingerprint it was measured on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import yaml
from pydantic import Field, model_validator

from voxtune.config import Config, ConfigError, load_config
from voxtune.data.synth import SynthRecipe, synthesize_corpus
from voxtune.errors import InputError
from voxtune.files import write_atomic

if TYPE_CHECKING:
    from voxtune.eval.natural import NaturalSuite

SUITES = Path(__file__).parent / "suites"
READY = "ready.json"  # written last: a set without it is incomplete and is rendered again


class SuiteError(InputError):
    """An unknown suite, or a suite file that does not load."""


# The figures a suite's targets can bound: the summary of every report.
SUMMARY_KEYS = (
    "cer_heldout_voices",
    "lid_accuracy",
    "style_accuracy",
    "intent_accuracy",
    "instruction_accuracy",
    "cer_snr10_over_clean",
    "rtf",
)

NoiseKind = Literal["white", "pink", "brown"]


class NoiseSection(Config):
    """Transcription under noise and on the telephone: the first `clips` transcription clips,
    each degraded with its own seeded noise (a kind drawn from `kinds`) at every SNR."""

    snr_db: list[float] = Field(default_factory=lambda: [20.0, 10.0, 5.0])
    kinds: list[NoiseKind] = Field(default_factory=lambda: list(get_args(NoiseKind)), min_length=1)
    telephone: bool = True
    clips: int = Field(200, ge=1)


class Target(Config):
    """A bound a summary figure should meet: at least `min`, at most `max`."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> Target:
        if (self.min is None) == (self.max is None):
            raise ValueError("a target has exactly one of min and max")
        return self

    def met(self, value: float | None) -> bool | None:
        """Whether `value` meets the bound (None when there is no value to judge)."""
        if value is None:
            return None
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Suite(Config):
    """One evaluation suite (voxtune/eval/suites/*.yaml)."""

    name: str
    version: int = Field(ge=1)
    corpus: SynthRecipe
    split: str = "test"
    lid_min_seconds: float = Field(2.0, ge=0)  # language ID is scored on clips at least this long
    noise: NoiseSection = Field(default_factory=NoiseSection)
    rtf_clips: int = Field(40, ge=1)  # transcribed one at a time to time the real-time factor
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 0  # of the noise draws
    sha256: str | None = None  # the fingerprint of the published rendering, to compare against
    targets: dict[str, Target] = Field(default_factory=dict)  # summary key -> bound, shown in the table

    @model_validator(mode="after")
    def _consistent(self) -> Suite:
        if self.split not in self.corpus.splits:
            raise ValueError(
                f"split {self.split!r} is not one of the corpus's splits ({', '.join(self.corpus.splits)})"
            )
        unknown = sorted(set(self.targets) - set(SUMMARY_KEYS))
        if unknown:
            raise ValueError(f"targets: {unknown[0]!r} is not a summary figure ({', '.join(SUMMARY_KEYS)})")
        return self


def load_suite(name: str) -> Suite | NaturalSuite:
    """The suite `name` (one of voxtune/eval/suites) or the suite file at path `name`: a corpus
    suite (`Suite`), or a natural-voice one (`kind: natural`, voxtune/eval/natural.py)."""
    path = SUITES / f"{name}.yaml"
    if not path.is_file():
        path = Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITES.glob("*.yaml")))
        raise SuiteError(f"no evaluation suite {name!r} (built in: {known}; or give a suite file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SuiteError(f"suite {path}: {error}") from None
    schema: type[Suite] | type[NaturalSuite] = Suite
    if isinstance(raw, dict) and raw.get("kind") == "natural":
        from voxtune.eval.natural import NaturalSuite

        schema = NaturalSuite
    try:
        return load_config(schema, path)
    except ConfigError as error:
        raise SuiteError(f"suite {path}: {error}") from None


def cache_root() -> Path:
    """Where rendered suites are kept: $VOXTUNE_CACHE/eval, else ~/.cache/voxtune/eval."""
    base = os.environ.get("VOXTUNE_CACHE") or Path.home() / ".cache" / "voxtune"
    return Path(base) / "eval"


def prepare(suite: Suite, root: str | os.PathLike | None = None, *, log=None) -> Path:
    """The folder of the suite's rendered set (its `<split>.jsonl` and audio), rendered on first
    use (about half a minute on two cores for the default suite)."""
    folder = Path(root or cache_root()) / f"{suite.name}-v{suite.version}"
    ready = folder / READY
    if ready.is_file() and json.loads(ready.read_text()).get("corpus") == suite.corpus.model_dump(mode="json"):
        return folder
    if log:
        log(f"rendering the {suite.name} evaluation set (v{suite.version}) into {folder}")
    synthesize_corpus(suite.corpus, folder, splits=[suite.split])
    info = {"corpus": suite.corpus.model_dump(mode="json"), "sha256": fingerprint(folder, suite.split)}
    write_atomic(ready, (json.dumps(info, indent=1) + "\n").encode())
    return folder


def fingerprint(folder: str | os.PathLike, split: str) -> str:
    """SHA-256 over the split's manifest and every audio file it names, in manifest order."""
    folder = Path(folder)
    digest = hashlib.sha256()
    manifest = (folder / f"{split}.jsonl").read_bytes()
    digest.update(manifest)
    for line in manifest.splitlines():
        digest.update((folder / json.loads(line)["audio"]).read_bytes())
    return digest.hexdigest()


def rendered_fingerprint(folder: str | os.PathLike) -> str:
    """The fingerprint recorded when `folder` was rendered."""
    return json.loads((Path(folder) / READY).read_text())["sha256"]
