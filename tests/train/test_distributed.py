"""Two processes (torchrun, Gloo on the CPU) train exactly as one with the same global batch.

    .venv/bin/python -m pytest -q tests/train/test_distributed.py

The two-process runs go through the real entry point: `python -m torch.distributed.run
--nproc_per_node 2 -m voxtune.cli train recipe.yaml`. One process with `train.grad_accum=2`
sees the same two micro-batches per step as two processes with one each.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import voxtune
from voxtune.config import dump_config
from voxtune.train.recipe import TrainRecipe
from voxtune.train.trainer import Trainer, TrainError

# Run alone by `make test` (see the marker in pyproject.toml).
pytestmark = pytest.mark.processes

STEPS = 4
ACCELERATE_CONFIGS = Path(__file__).parents[2] / "docs" / "accelerate"


@pytest.fixture
def _recipe(tiny_recipe):
    """`_recipe(corpus, run_dir, *overrides)`: the shared tiny recipe, 4 steps, evaluated and
    checkpointed every 2."""
    return lambda corpus, run_dir, *overrides: tiny_recipe(
        run_dir, f"train.max_steps={STEPS}", "eval.every=2", "output.save_every=2", "output.keep=2", *overrides
    )


def _torchrun(recipe: TrainRecipe, tmp_path, *args: str, env: dict[str, str] | None = None) -> str:
    """`voxtune train` in two processes on this machine; returns what they printed."""
    port = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    launcher = ["torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", *port]
    return _launch(launcher, recipe, tmp_path, *args, env=env)


def _accelerate(config, recipe: TrainRecipe, tmp_path, *args: str) -> str:
    """`accelerate launch --config_file CONFIG --num_processes 2 -m voxtune.cli train`; returns
    what the processes printed."""
    launcher = ["accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2"]
    return _launch([*launcher, "--main_process_port", str(_free_port())], recipe, tmp_path, *args)


def _launch(launcher: list[str], recipe: TrainRecipe, tmp_path, *args: str, env: dict[str, str] | None = None) -> str:
    """`python -m LAUNCHER... -m voxtune.cli train RECIPE ARGS`, which must succeed."""
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(dump_config(recipe))
    command = [sys.executable, "-m", *launcher, "-m", "voxtune.cli", "train", str(path), *args]
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _curve(run_dir) -> list[tuple[int, str, float]]:
    """(step, what, value) of every logged loss and gradient norm (before clipping)."""
    return [
        (r["step"], key, r[key]) for r in _records(run_dir) for key in ("loss", "grad_norm", "eval_loss") if key in r
    ]


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors")


def _assert_same_run(got_dir, expected_dir, *, from_step: int = 0) -> None:
    got = [c for c in _curve(got_dir) if c[0] > from_step]
    expected = [c for c in _curve(expected_dir) if c[0] > from_step]
    assert [c[:2] for c in got] == [c[:2] for c in expected]  # one record each: only rank 0 logs
    assert [c[2] for c in got] == pytest.approx([c[2] for c in expected], rel=1e-5)
    got_weights, expected_weights = _weights(got_dir, STEPS), _weights(expected_dir, STEPS)
    assert sorted(got_weights) == sorted(expected_weights)
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(got_weights[name], tensor, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_as_one_with_the_same_global_batch(corpus, tmp_path, method, _recipe):
    one = Trainer(_recipe(corpus, tmp_path / "one", f"train.method={method}", "train.grad_accum=2"), log=lambda _: None)
    one.fit()
    _torchrun(_recipe(corpus, tmp_path / "two", f"train.method={method}", "train.grad_accum=1"), tmp_path)

    assert len([c for c in _curve(tmp_path / "two") if c[1] == "loss"]) == STEPS
    _assert_same_run(tmp_path / "two", tmp_path / "one")

    # Both stopped at the same place in the data, and rank 0 alone exported the model.
    def position(run: str) -> dict:  # the step and the place in the data (not the time it took)
        state = json.loads((tmp_path / run / "checkpoints" / "step-0000002" / "state.json").read_text())
        return {key: value for key, value in state.items() if key != "seconds"}

    assert position("two") == position("one")
    assert (tmp_path / "two" / "model").is_dir()
    assert (tmp_path / "two" / "adapter").is_dir() == (method == "lora")

    # A checkpoint of two processes goes on in one: the same steps 3 and 4.
    later = shutil.ignore_patterns(f"step-{STEPS:07d}", "model", "adapter")
    shutil.copytree(tmp_path / "two", tmp_path / "two-then-one", ignore=later)
    recipe = _recipe(corpus, tmp_path / "two-then-one", f"train.method={method}", "train.grad_accum=2")
    Trainer(recipe, log=lambda _: None).fit(resume=True)
    _assert_same_run(tmp_path / "two-then-one", tmp_path / "one", from_step=2)


def test_one_process_checkpoint_goes_on_in_two(corpus, tmp_path, _recipe):
    one = Trainer(_recipe(corpus, tmp_path / "one", "train.grad_accum=2"), log=lambda _: None)
    one.fit()
    shutil.copytree(tmp_path / "one", tmp_path / "one-then-two", ignore=shutil.ignore_patterns(f"step-{STEPS:07d}"))
    _torchrun(_recipe(corpus, tmp_path / "one-then-two", "train.grad_accum=1"), tmp_path, "--resume")
    _assert_same_run(tmp_path / "one-then-two", tmp_path / "one", from_step=2)
    assert [c[:2] for c in _curve(tmp_path / "one-then-two") if c[1] != "grad_norm"] == [
        (1, "loss"),
        (2, "loss"),
        (2, "eval_loss"),
        (3, "loss"),
        (4, "loss"),
        (4, "eval_loss"),
    ]  # nothing logged twice


@pytest.mark.parametrize("method,reshard", [("lora", "true"), ("full", "false")])
def test_fsdp_shards_and_trains_as_one_process(corpus, tmp_path, method, reshard, _recipe):
    """FSDP2 (the strategy an accelerate FSDP config asks for): the same curve and weights as
    one process, checkpoints that one process resumes, and an export made by rank 0."""
    one = Trainer(_recipe(corpus, tmp_path / "one", f"train.method={method}", "train.grad_accum=2"), log=lambda _: None)
    one.fit()
    printed = _torchrun(
        _recipe(
            corpus, tmp_path / "two", f"train.method={method}", "train.grad_accum=1", f"train.fsdp_reshard={reshard}"
        ),
        tmp_path,
        env={"ACCELERATE_USE_FSDP": "true"},
    )
    assert "2 processes: fsdp" in printed
    _assert_same_run(tmp_path / "two", tmp_path / "one")
    exported = voxtune.load(tmp_path / "two" / "model")
    one.export()
    expected = voxtune.load(tmp_path / "one" / "model")
    for (name, got), (_, want) in zip(exported.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)

    later = shutil.ignore_patterns(f"step-{STEPS:07d}", "model", "adapter")
    shutil.copytree(tmp_path / "two", tmp_path / "two-then-one", ignore=later)
    recipe = _recipe(corpus, tmp_path / "two-then-one", f"train.method={method}", "train.grad_accum=2")
    Trainer(recipe, log=lambda _: None).fit(resume=True)
    _assert_same_run(tmp_path / "two-then-one", tmp_path / "one", from_step=2)


@pytest.mark.parametrize("stage,method", [(2, "lora"), (3, "full")])
def test_deepspeed_zero_trains_resumes_and_exports_as_one_process(corpus, tmp_path, stage, method, _recipe):
    """A real `accelerate launch` with the shipped DeepSpeed config: the same curve and weights
    as one process with the same global batch, an export made by rank 0, and (ZeRO-3) a resume
    of the DeepSpeed run that goes on exactly."""
    one = Trainer(_recipe(corpus, tmp_path / "one", f"train.method={method}", "train.grad_accum=2"), log=lambda _: None)
    one.fit()
    config = ACCELERATE_CONFIGS / f"deepspeed-zero{stage}.yaml"
    two = _recipe(corpus, tmp_path / "two", f"train.method={method}", "train.grad_accum=1")
    printed = _accelerate(config, two, tmp_path)
    assert f"2 processes: deepspeed (ZeRO-{stage})" in printed
    _assert_same_run(tmp_path / "two", tmp_path / "one")
    assert (tmp_path / "two" / "checkpoints" / f"step-{STEPS:07d}" / "zero").is_dir()  # DeepSpeed's own split state
    exported = voxtune.load(tmp_path / "two" / "model")
    one.export()
    expected = voxtune.load(tmp_path / "one" / "model")
    for (name, got), (_, want) in zip(exported.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)

    if stage == 2:
        return  # resuming is the same code for both stages; ZeRO-3's split weights make it the harder one
    # Killed after step 2: the same launch with --resume goes on to the same steps 3 and 4.
    later = shutil.ignore_patterns(f"step-{STEPS:07d}", "model", "adapter")
    shutil.copytree(tmp_path / "two", tmp_path / "two-again", ignore=later)
    again = _recipe(corpus, tmp_path / "two-again", f"train.method={method}", "train.grad_accum=1")
    _accelerate(config, again, tmp_path, "--resume")
    _assert_same_run(tmp_path / "two-again", tmp_path / "one", from_step=2)

    # DeepSpeed's optimizer state is split its own way: another strategy refuses it, saying why.
    with pytest.raises(TrainError, match="written by DeepSpeed"):
        Trainer(again, log=lambda _: None).fit(resume=True)


def test_a_deepspeed_launch_that_offloads_is_refused_not_ignored(corpus, tmp_path, monkeypatch, _recipe):
    # What `accelerate launch` sets for a DeepSpeed config with offload_optimizer_device: cpu.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(TrainError, match="offload"):
        Trainer(_recipe(corpus, tmp_path), log=lambda _: None)
