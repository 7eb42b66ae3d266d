"""4-bit NF4 layers for QLoRA: swapped in place, trained through, merged back in full precision."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from voxtune.model.quantize import dequantized_weight, merge_to_full_precision, quantize_linears

pytest.importorskip("bitsandbytes", reason="QLoRA's 4-bit layers need bitsandbytes")


def is_quantized(root: torch.nn.Module) -> bool:
    """Whether any layer under `root` holds 4-bit weights."""
    return any(hasattr(getattr(m, "weight", None), "quant_state") for m in root.modules())


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(128, 256)
        self.down = torch.nn.Linear(256, 128, bias=False)
        self.head = torch.nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def _block() -> _Block:
    torch.manual_seed(0)
    return _Block().eval()


def test_linears_become_4_bit_in_place_but_the_skipped_and_they_still_compute_the_layer():
    block = _block()
    full = copy.deepcopy(block)
    assert quantize_linears(block, skip=[block.head]) == 2
    assert is_quantized(block) and type(block.head) is torch.nn.Linear
    assert block.up.weight.numel() * block.up.weight.element_size() == 128 * 256 // 2  # 4 bits a weight
    x = torch.randn(8, 128, requires_grad=True)
    y, expected = block(x), full(x)
    assert (y - expected).norm() < 0.2 * expected.norm()  # NF4 rounding (a random layer is ~1.4), not another function
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients flow through the 4-bit layers
    assert not any(p.requires_grad for p in block.up.parameters())


def test_the_merge_keeps_a_small_lora_update_that_requantising_would_round_away():
    block = _block()
    quantize_linears(block, skip=[block.head])
    lora = get_peft_model(block, LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(1e-3)  # a small update, as a few steps of training make
    x = torch.randn(8, 128)
    with torch.no_grad():
        trained = lora(x)
        base = dequantized_weight(lora.base_model.model.up.get_base_layer()).clone()
        delta = lora.base_model.model.up.get_delta_weight("default").clone()
        assert merge_to_full_precision(lora) == 2
        merged = lora.merge_and_unload()
        ours = merged(x)
    assert not is_quantized(merged) and type(merged.up) is torch.nn.Linear
    assert (ours - trained).abs().max() <= 1e-5  # the model computes what it trained
    assert torch.allclose(merged.up.weight - base, delta, atol=1e-7)
    requantised = torch.nn.Sequential(copy.deepcopy(merged.up))
    quantize_linears(requantised)
    # What re-quantising the sum (peft's merge into 4-bit layers) would lose: more than the update.
    assert (dequantized_weight(requantised[0]) - merged.up.weight).abs().mean() > delta.abs().mean()
