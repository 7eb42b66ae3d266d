"""Several training processes, as `torchrun` or `accelerate launch` start them (DDP, FSDP or
DeepSpeed ZeRO).

    torchrun --nproc_per_node 2 -m voxtune.cli train recipes/quickstart.yaml
    accelerate launch --config_file docs/accelerate/ddp.yaml -m voxtune.cli train recipes/quickstart.yaml
    accelerate launch --config_file docs/accelerate/fsdp.yaml -m voxtune.cli train recipes/quickstart.yaml
    accelerate launch --config_file docs/accelerate/deepspeed-zero3.yaml -m voxtune.cli train recipes/quickstart.yaml

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process.
`start()` reads them: with WORLD_SIZE > 1 it joins the process group (NCCL on CUDA, Gloo on the
CPU); without them it is one process and touches nothing. Importing this module does nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Processes", "choose_strategy", "ignored_launch_settings", "start", "unsupported_launch"]


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one process: rank 0 of 1).

    Attributes:
        rank: this process's index, 0 .. world - 1; rank 0 logs, evaluates and checkpoints.
        world: how many processes train together.
        local_rank: the index on this machine, which picks the GPU.
        owns_group: whether `start()` made the process group (and `close()` ends it).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Whether this is the process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this process trains: its GPU when there are GPUs, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def active(self) -> bool:
        """Whether there are other processes to talk to right now."""
        return self.world > 1 and dist.is_initialized()

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for with one)."""
        if self.active:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (float64, so token counts stay exact)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's `value` (any picklable object), in rank order."""
        if not self.active:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        """End the process group if `start()` made it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def start() -> Processes:
    """Join the training processes the launcher started, or be the only one.

    With WORLD_SIZE > 1 (torchrun, accelerate launch) this initialises torch.distributed from
    the environment unless it already is (then the caller's group is used, and left alone).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Processes(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return Processes(rank=rank, world=world, local_rank=local_rank, owns_group=True)


def choose_strategy(requested: str, processes: Processes) -> str:
    """How the processes share the work: "single" (one process), "ddp" (a whole replica each),
    "fsdp" (weights, gradients and optimizer state sharded, FSDP2) or "deepspeed" (ZeRO-2 or
    ZeRO-3, `voxtune.train.zero`). `requested` is the recipe's `train.strategy`; "auto" follows
    the launcher (an accelerate FSDP config sets ACCELERATE_USE_FSDP, a DeepSpeed one
    ACCELERATE_USE_DEEPSPEED) and is DDP otherwise."""
    if processes.world == 1:
        return "single"
    if requested == "auto":
        if _flag("ACCELERATE_USE_DEEPSPEED"):
            return "deepspeed"
        return "fsdp" if _flag("ACCELERATE_USE_FSDP") else "ddp"
    return requested


def unsupported_launch() -> str | None:
    """Why the launcher's settings cannot be honoured, or None when they can.

    A DeepSpeed config that offloads the optimizer or the weights to the CPU or NVMe asks for
    DeepSpeed's compiled CPU optimizer and swapping, which voxtune does not run; ignoring it
    would quietly keep them in GPU memory instead.
    """
    if not _flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    for what, variable in (("optimizer", "OPTIMIZER"), ("param", "PARAM")):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{variable}_DEVICE", "none")
        if device != "none":
            return (
                f"the launcher asks DeepSpeed to offload the {what} to {device}, which voxtune does not run: "
                "set offload_optimizer_device and offload_param_device to none (ZeRO-3 splits the weights, "
                "gradients and optimizer state over the GPUs instead)"
            )
    return None


def ignored_launch_settings() -> list[str]:
    """Launcher settings this trainer does not follow (the recipe decides them instead)."""
    notes = []
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":
        notes.append(f"the launcher's mixed_precision={precision} is ignored: the recipe's train.precision decides")
    if _flag("ACCELERATE_USE_FSDP") and any(k.startswith("FSDP_") for k in os.environ):
        notes.append(
            "the launcher's fsdp_config details are not read: voxtune shards each decoder layer and the rest as "
            "one group (FULL_SHARD), and checkpoints whole tensors"
        )
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        launcher = {
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps (train.grad_accum rules)",
            "ACCELERATE_GRADIENT_CLIPPING": "gradient_clipping (optim.grad_clip rules)",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": "deepspeed_config_file (DeepSpeed's config is made from the recipe)",
        }
        notes += [f"the launcher's {what} is ignored" for variable, what in launcher.items() if variable in os.environ]
    return notes


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "false").lower() == "true"
