"""LoRA adapters (peft's) whose sibling layers share one down-projection of their input.

q/k/v read the same hidden states, and so do gate/up. peft's LoRA layer casts its input to the
adapters' dtype and multiplies it by its own A, once per layer, then scales the [N, out] update
and adds it in float32. Here the first sibling called computes the down-projection for all of
them, `x @ cat(s_i * A_i)^T` [N, sum r], in one matrix product from one cast of `x`; each
sibling then takes its [N, r_i] slice through its own B, and the update is added in the base
layer's dtype. Scaling A (a few thousand numbers) instead of the update ([N, out]) saves an
elementwise pass too.

The adapters are peft's own: the same parameters under the same names, so they are saved,
loaded, merged and switched off by peft, and a checkpoint is a plain peft adapter. Where the
fast path does not apply, the layer runs peft's forward: without gradients (evaluation,
serving), with adapters switched off or merged, several active adapters, variants such as
DoRA, a LoRA bias, and inside `torch.compile`. Layers with dropout take the fast path alone
(siblings would share one dropout mask).

Which layers share an input is read from their names (`SHARED_INPUTS`) and checked on every
call: a sibling called with another tensor than the one its group's product was made from
(cross-attention's q reads the decoder, its k and v the encoder) makes a new product for the
whole group, so results never depend on the order of calls, and a recomputation (activation
checkpointing) takes the same path as the forward it repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from torch.nn import functional as F

# Sibling layers that read one input, in the model families voxtune trains.
SHARED_INPUTS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputLoraLinear(PeftLoraLinear):
    """peft's LoRA `Linear`; when linked (`link_siblings`), its adapter's down-projection comes
    from its group's one product over the shared input."""

    group: _Siblings | None = None  # set by link_siblings; None: peft's own forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """base(x) + B(s A x): peft's result, A's product shared with the siblings."""
        group = self.group
        # Training only: a group holds one input between its layers' calls, which a server's
        # threads sharing the model could interleave.
        fast = torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if group is None or args or kwargs or not fast or self.plain_adapter() is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        adapter = self.active_adapters[0]
        update = self.lora_B[adapter](group.down(self, x, adapter))  # [..., out]
        return result + update.to(result.dtype)

    def plain_adapter(self) -> str | None:
        """The one active vanilla LoRA adapter (not merged, not switched off, no variant, no
        bias: what the fast path computes exactly as peft does), or None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        plain = adapter in self.lora_A and adapter not in self.lora_variant and not self.lora_bias.get(adapter)
        return adapter if plain else None


class _Siblings:
    """Linked LoRA layers that read one input: the first one called computes the scaled
    down-projection for all, the others take their slice of it."""

    def __init__(self, layers: Sequence[SharedInputLoraLinear]) -> None:
        self.layers = list(layers)
        self._input: torch.Tensor | None = None
        self._version = 0  # the input's, when its product was computed
        self._down: torch.Tensor | None = None
        self._waiting: list[SharedInputLoraLinear] = []  # the layers yet to take their slice

    def down(self, layer: SharedInputLoraLinear, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """`s A x` for `layer` [..., r]: its slice of the group's product over `x`."""
        down = self._down
        if down is not None and x is self._input and x._version == self._version and layer in self._waiting:
            self._waiting.remove(layer)
            if not self._waiting:  # every layer has its slice: let go of the input
                self._input = self._down = None
            return self._slice(down, layer, adapter)
        if len(self.layers) == 1 or any(other.plain_adapter() != adapter for other in self.layers):
            return _down_projection([layer], x, adapter)  # a sibling is switched off, merged...
        down = _down_projection(self.layers, x, adapter)
        self._input, self._version, self._down = x, x._version, down
        self._waiting = [other for other in self.layers if other is not layer]
        return self._slice(down, layer, adapter)

    def _slice(self, down: torch.Tensor, layer: SharedInputLoraLinear, adapter: str) -> torch.Tensor:
        """`layer`'s columns of the group's product [..., sum r] -> [..., r]."""
        start = sum(other.r[adapter] for other in self.layers[: self.layers.index(layer)])
        return down[..., start : start + layer.r[adapter]]


def _down_projection(layers: Sequence[SharedInputLoraLinear], x: torch.Tensor, adapter: str) -> torch.Tensor:
    """x [..., in] -> [..., sum r]: every layer's scaled A applied to `x`, in one product."""
    weights = [layer.lora_A[adapter].weight * layer.scaling[adapter] for layer in layers]
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)  # [sum r, in]
    first = layers[0]
    x = first._cast_input_dtype(x, stacked.dtype)
    return F.linear(first.lora_dropout[adapter](x), stacked)


def link_siblings(module: nn.Module) -> int:
    """Put every LoRA layer in `module` on the fast path. Siblings (layers under one parent
    whose names form a group of `SHARED_INPUTS`) share one down-projection; any other layer,
    and any layer with dropout (siblings would share one dropout mask), computes its own.
    Returns how many groups of more than one layer were linked."""
    shared = 0
    for parent in module.modules():
        linked: set[str] = set()
        for names in SHARED_INPUTS:
            layers = [getattr(parent, name, None) for name in names]
            present = [layer for layer in layers if isinstance(layer, SharedInputLoraLinear)]
            if len(present) < 2 or any(_has_dropout(layer) for layer in present):
                continue
            group = _Siblings(present)
            for layer in present:
                layer.group = group
            linked.update(name for name, layer in zip(names, layers, strict=True) if layer in present)
            shared += 1
        for name, child in parent.named_children():
            if isinstance(child, SharedInputLoraLinear) and name not in linked:
                child.group = _Siblings([child])
    return shared


def unlink_siblings(module: nn.Module) -> None:
    """Give every LoRA layer in `module` peft's own forward back (e.g. under ZeRO-3, which
    gathers a layer's weights only for its own call, not its siblings')."""
    for layer in module.modules():
        if isinstance(layer, SharedInputLoraLinear):
            layer.group = None


def _has_dropout(layer: SharedInputLoraLinear) -> bool:
    """Whether any of the layer's adapters has dropout on its input."""
    return any(not isinstance(dropout, nn.Identity) for dropout in layer.lora_dropout.values())
