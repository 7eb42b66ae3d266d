"""A training run's checkpoints: `<output>/checkpoints/step-NNNNNNN/`, each written atomically
(a folder appears whole or not at all), with the trainable weights as whole tensors keyed by
parameter name, so that a run goes on with any number of processes:

    trainable.safetensors   the weights that train
    optimizer.pt            the optimizer and schedule state, the RNG of each process
    state.json              where the run is (`TrainState`)
    zero/                   under DeepSpeed: its own optimizer state, split over the processes
                            (a DeepSpeed run resumes with as many processes and the same stage)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file

from voxtune.files import WriteError, atomic_directory, reported_writes
from voxtune.train.distributed import Processes
from voxtune.train.model_setup import TrainError
from voxtune.train.zero import STATE_TAG, Zero

CHECKPOINTS = "checkpoints"


def latest(out: Path) -> Path:
    """The newest checkpoint of the run in `out`."""
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    if not found:
        raise TrainError(f"nothing to resume: no checkpoints in {out / CHECKPOINTS}")
    return found[-1]


def trained_weights(checkpoint: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights, checked against `model`'s trainable parameters."""
    weights = load_file(checkpoint / "trainable.safetensors")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(weights) - trainable)
    if unknown:
        raise TrainError(f"{checkpoint} does not fit this recipe's model: unknown weights {', '.join(unknown[:3])}")
    return weights


def save(
    out: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    procs: Processes,
    keep: int,
    zero: Zero | None = None,
) -> Path:
    """Write the checkpoint of step `state["step"]`, keeping the newest `keep`.

    Every process takes part (under FSDP and ZeRO-3 the weights are gathered from the shards;
    under DeepSpeed each process writes its part of the optimizer state); rank 0 writes the
    rest, and every process returns once the checkpoint is there.
    """
    target = out / CHECKPOINTS / f"step-{state['step']:07d}"
    rngs = procs.all_gather(torch.get_rng_state())  # each process's, for dropout after resume
    if zero is None:
        weights, optimizer_state = _whole_state(model, optimizer)
    else:
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        with zero.gathered(p for _, p in trainable):
            weights = {name: p.detach().to("cpu", copy=True) for name, p in trainable} if procs.main else {}
        # Each process writes its part beside the checkpoint; rank 0 moves it in (a folder
        # `clear_staging` removes if a kill leaves it).
        shared = target.parent / f".{target.name}.{STATE_TAG}"
        zero.save_state(shared)
        procs.barrier()
    if procs.main:
        extra: dict[str, Any] = {"scheduler": scheduler.state_dict(), "rng": rngs[0]}
        if zero is None:
            extra["optimizer"] = optimizer_state
        else:
            extra["zero"] = {"stage": zero.stage, "world": procs.world}
        if procs.world > 1:
            extra["rng_per_process"] = rngs
        try:
            with reported_writes(f"the checkpoint {target}"), atomic_directory(target) as staging:
                save_file({k: v.contiguous() for k, v in weights.items()}, staging / "trainable.safetensors")
                torch.save(extra, staging / "optimizer.pt")
                (staging / "state.json").write_text(json.dumps(state))
                if zero is not None:
                    os.replace(shared / STATE_TAG, staging / STATE_TAG)
        except WriteError as error:
            raise TrainError(f"{error} (the checkpoints written before are whole: make room, then --resume)") from None
        if zero is not None:
            shutil.rmtree(shared, ignore_errors=True)
        for old in sorted((out / CHECKPOINTS).glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    procs.barrier()
    return target


def _whole_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """The trainable weights and the optimizer state as whole tensors (gathered from FSDP's shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(full=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # Frozen 4-bit layers (QLoRA) add their quantisation statistics, which are not parameters.
    weights = {k: v for k, v in get_model_state_dict(model, options=options).items() if k in trainable}
    return cast(dict[str, torch.Tensor], weights), get_optimizer_state_dict(model, optimizer, options=options)


def restore(
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    procs: Processes,
    zero: Zero | None = None,
) -> dict[str, Any]:
    """Load `checkpoint` into the model, optimizer, schedule and RNG; returns its saved state."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    extra = torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="cpu")  # the optimizer moves it
    written = extra.get("zero")
    if zero is not None or written is not None:
        _check_zero(checkpoint, written, zero, procs)
    if zero is not None:
        zero.load_state(checkpoint)
    else:
        set_model_state_dict(model, dict(trained_weights(checkpoint, model)), options=_options(full=False))
        set_optimizer_state_dict(model, optimizer, extra["optimizer"], options=_options(full=False))
    scheduler.load_state_dict(extra["scheduler"])
    rngs = extra.get("rng_per_process")
    # A checkpoint of as many processes gives each its own RNG back; otherwise rank 0's.
    torch.set_rng_state(rngs[procs.rank] if rngs and len(rngs) == procs.world else extra["rng"])
    return json.loads((checkpoint / "state.json").read_text())


def _check_zero(checkpoint: Path, written: dict[str, int] | None, zero: Zero | None, procs: Processes) -> None:
    """DeepSpeed splits the optimizer state its own way: its checkpoints go on under the same
    stage and number of processes only, and others' not under DeepSpeed."""
    if written is None:
        raise TrainError(
            f"{checkpoint} was written without DeepSpeed: resume it with the strategy that wrote it "
            "(its weights and optimizer state are whole tensors, for any number of processes)"
        )
    if zero is None or written != {"stage": zero.stage, "world": procs.world}:
        stage, world = written["stage"], written["world"]
        raise TrainError(
            f"{checkpoint} was written by DeepSpeed ZeRO-{stage} in {world} processes, which split its optimizer "
            f"state their own way: resume with the same launch (docs/accelerate/deepspeed-zero{stage}.yaml, "
            f"--num_processes {world}); its trained weights (trainable.safetensors) are whole, and export reads them"
        )


def clear_staging(out: Path) -> None:
    """Remove checkpoint folders a killed run left half-written (`atomic_directory`'s staging)."""
    for staging in (out / CHECKPOINTS).glob(".step-*"):
        shutil.rmtree(staging, ignore_errors=True)


def _options(*, full: bool) -> Any:
    """Trainable weights only, as whole tensors (`full`: gathered to rank 0 on the CPU; else
    each process receives the whole tensors it loads and keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if full:
        return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
