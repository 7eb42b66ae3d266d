"""4-bit NF4 linear layers for QLoRA (bitsandbytes), swapped in place, and back to full precision.

    quantize_linears(model.base_lm(), skip=[head])    # the frozen LM in 4 bits; LoRA goes on top
    merge_to_full_precision(model.lm)                  # before peft's merge: W = dequant(W4) + BA

In place, so a model whose LM is a view into another (an architecture's checkpoint) stays one
model: the swapped layers are the same objects in both trees.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, cast

import torch

if TYPE_CHECKING:
    from bitsandbytes.nn import Params4bit


class _LoraLayer(Protocol):
    """What this module uses of a peft LoRA layer (one with `get_delta_weight`)."""

    @property
    def disable_adapters(self) -> bool: ...
    @property
    def merged(self) -> bool: ...
    @property
    def active_adapters(self) -> list[str]: ...
    @property
    def lora_A(self) -> torch.nn.ModuleDict: ...
    def get_base_layer(self) -> torch.nn.Module: ...
    def get_delta_weight(self, adapter: str) -> torch.Tensor: ...


def _bnb() -> ModuleType:
    """bitsandbytes, imported when 4-bit layers are wanted (it is an optional dependency)."""
    import bitsandbytes

    return bitsandbytes


def _children(root: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, name, child) for every module under `root`, listed before any is swapped."""
    return [(parent, name, child) for parent in root.modules() for name, child in parent.named_children()]


def quantize_linears(
    root: torch.nn.Module, *, skip: Iterable[torch.nn.Module] = (), compute_dtype: torch.dtype | None = None
) -> int:
    """Swap every `torch.nn.Linear` under `root` (but those in `skip`) for a bitsandbytes NF4
    `Linear4bit` holding the same weights, quantised in blocks of 64 with double-quantised
    statistics; returns how many were swapped. Matmuls run in `compute_dtype` (default: each
    layer's own dtype). The quantised layers are frozen."""
    bnb = _bnb()
    skipped = {id(module) for module in skip}
    swapped = 0
    for parent, name, child in _children(root):
        if type(child) is not torch.nn.Linear or id(child) in skipped:
            continue
        weight = child.weight
        layer = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=compute_dtype or weight.dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        ).to(weight.device)  # moving it to its device is what quantises it
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
        # Its CPU inference path repacks the weights in place into a bf16 layout that needs
        # in_features % 64 == 0: evaluation between steps would compute otherwise than training.
        layer.support_avx512bf16_for_cpu = False
        setattr(parent, name, layer)
        swapped += 1
    return swapped


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A 4-bit layer's weight [out, in] as the forward pass uses it, in its compute dtype."""
    weight = cast("Params4bit", layer.weight)
    full = _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)
    return full.to(getattr(layer, "compute_dtype", None) or full.dtype)


def merge_to_full_precision(root: torch.nn.Module) -> int:
    """Swap every 4-bit layer under `root` for a `torch.nn.Linear` whose weight is its
    dequantised one plus, for a peft LoRA layer on top of it, the adapters' product; returns
    how many were swapped. peft's own merge re-quantises the sum, which rounds a small LoRA
    update away; this keeps the sum in full precision, so the model computes what it trained."""
    swapped = 0
    for parent, name, child in _children(root):
        if hasattr(parent, "get_delta_weight"):
            continue  # a LoRA layer's own base layer: merged with it, as its child
        lora = cast(_LoraLayer, child) if hasattr(child, "get_delta_weight") else None
        module = lora.get_base_layer() if lora is not None else child
        if not hasattr(getattr(module, "weight", None), "quant_state"):
            continue
        base = cast(torch.nn.Linear, module)  # a bitsandbytes Linear4bit, a subclass
        weight = dequantized_weight(base)
        if lora is not None and base is not child and not (lora.disable_adapters or lora.merged):
            for adapter in lora.active_adapters:
                if adapter in lora.lora_A:
                    weight = weight + lora.get_delta_weight(adapter).to(weight.dtype)
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device="meta")
        layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        if base.bias is not None:
            layer.bias = torch.nn.Parameter(base.bias.data.to(weight.dtype), requires_grad=False)
        setattr(parent, name, layer)
        swapped += 1
    return swapped
