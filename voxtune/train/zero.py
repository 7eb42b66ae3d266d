"""DeepSpeed ZeRO for the training loop: what `accelerate launch` with a DeepSpeed config asks for
(docs/accelerate/deepspeed-zero2.yaml, deepspeed-zero3.yaml), or `train.strategy=deepspeed`.

ZeRO-2 splits the gradients and AdamW's state over the processes and keeps whole weights on
each; ZeRO-3 splits the weights too, gathering each module's for its own forward and backward.
DeepSpeed owns the update: it reduces the gradients, clips them, and steps AdamW (torch's, as
the other strategies) and the schedule after the step's last micro-batch.

DeepSpeed is imported only when a run uses it (`pip install 'voxtune[deepspeed]'`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from voxtune.train.model_setup import TrainError
from voxtune.train.recipe import OptimSection, TrainSection

__all__ = ["STATE_TAG", "Zero", "zero_stage"]

STATE_TAG = "zero"  # the folder DeepSpeed's own state goes to, inside a voxtune checkpoint


def zero_stage(requested: int | None) -> int:
    """The ZeRO stage: the recipe's `train.zero_stage`, else the launcher's (accelerate's
    `deepspeed_config.zero_stage`), else 2."""
    if requested is not None:
        return requested
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if launcher is None:
        return 2
    if launcher not in ("2", "3"):
        raise TrainError(f"the launcher asks for ZeRO stage {launcher}: voxtune runs stages 2 and 3")
    return int(launcher)


class Zero:
    """A `torch.nn.Module` (the training forward) inside a DeepSpeed engine with `optimizer` and
    `scheduler`; `backward` runs one micro-batch's backward and DeepSpeed's step, which updates
    after the step's last micro-batch."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        train: TrainSection,
        optim: OptimSection,
        *,
        stage: int,
        read_outside_forward: Iterable[torch.nn.Parameter] = (),
    ) -> None:
        try:
            import deepspeed
        except ImportError:
            raise TrainError("DeepSpeed is not installed: pip install 'voxtune[deepspeed]'") from None
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-step INFO lines
        self.stage = stage
        config = {
            # voxtune's micro-batches hold a token budget, not a number of examples: DeepSpeed
            # only counts them.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": train.grad_accum,
            "gradient_clipping": optim.grad_clip or 0.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, as the other strategies use
            "steps_per_print": 1 << 30,
        }
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
        if stage == 3:
            from deepspeed.runtime.zero import register_external_parameter

            # ZeRO-3 gathers a module's weights for its own forward only; the chunked loss reads
            # the output head's weights without calling it.
            for parameter in read_outside_forward:
                register_external_parameter(self.engine.module, parameter)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (already weighted) loss, then DeepSpeed's step: the
        gradients are reduced, clipped and applied after the step's last micro-batch."""
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop weights each micro-batch itself
        self.engine.step()

    def grad_norm(self) -> float:
        """The gradient norm of the last update, before clipping (the same on every process)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    @contextlib.contextmanager
    def gathered(self, parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
        """Whole `parameters` on every process inside the block (ZeRO-3 splits them; every
        process must enter); nothing to do under ZeRO-2."""
        if self.stage != 3:
            yield
            return
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters(list(parameters), modifier_rank=None):
            yield

    def save_state(self, directory: Path) -> None:
        """Every process writes its part of the optimizer (and, under ZeRO-3, of the trainable
        weights) into `directory`/zero."""
        self.engine.save_checkpoint(str(directory), tag=STATE_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_state(self, directory: Path) -> None:
        """Read back what `save_state` wrote (the same number of processes and ZeRO stage)."""
        loaded, _ = self.engine.load_checkpoint(str(directory), tag=STATE_TAG, load_module_strict=False)
        if loaded is None:
            raise TrainError(f"{directory} holds no DeepSpeed state for this run")
