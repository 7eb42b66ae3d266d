"""Per-example attention in packed rows: the same loss and gradients as padded batches, no
[L, L] mask, and every other call (generation) exactly as before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from voxtune.model import tiny
from voxtune.model.packed_attention import PACKED_ATTENTION, block_causal_mask, use_packed_attention
from voxtune.train.trainer import compute_loss


def _examples(model, make_clip):
    examples = []
    for i, seconds in enumerate([0.3, 0.5, 0.8]):
        messages = [
            {
                "role": "user",
                "content": [{"type": "audio", "audio": make_clip(seconds, seed=i)}, {"type": "text", "text": "hi"}],
            },
            {"role": "assistant", "content": "hello world " * (i + 1)},
        ]
        examples.append(model.processor.encode_messages(messages, with_labels=True))
    return examples


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, _ = compute_loss(model, batch, chunk_tokens=16)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,window", [("llama", None), ("qwen2", None), ("mistral", 7)])
def test_packed_rows_train_like_padded_batches(family, window, make_clip):
    model = tiny(family).train()
    if window is not None:
        model.lm.config.sliding_window = window  # shorter than every example: the window matters
    examples = _examples(model, make_clip)
    padded_loss, padded_grads = _loss_and_grads(model, model.processor.collate(examples))
    assert use_packed_attention(model.lm)
    assert model.lm.config._attn_implementation == PACKED_ATTENTION
    packed = model.processor.pack(examples)
    inputs = model.lm_inputs(packed)
    assert inputs["attention_mask"].shape == packed["input_ids"].shape  # [1, L] padding mask, no [L, L]
    assert inputs["cu_seq_lens_q"].tolist()[-1] == packed["input_ids"].shape[1]
    packed_loss, packed_grads = _loss_and_grads(model, packed)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_generation_is_unchanged_by_the_switch(make_clip):
    model = tiny("llama")
    conversations = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "a longer greeting here"}]]
    before = model.generate(conversations, max_new_tokens=8)
    assert use_packed_attention(model.lm)
    assert model.generate(conversations, max_new_tokens=8) == before


def test_a_dense_mask_cannot_hold_a_sliding_window(make_clip):
    model = tiny("mistral")
    model.lm.config.sliding_window = 7
    model.lm.set_attn_implementation("eager")  # not switched: packed rows go through the [L, L] mask
    assert not use_packed_attention(model.lm)
    with pytest.raises(ValueError, match="sliding window"):
        model.lm_inputs(model.processor.pack(_examples(model, make_clip)))


def test_under_cpu_autocast_packed_rows_attend_in_float32(make_clip):
    model = tiny("llama").train()
    assert use_packed_attention(model.lm)
    packed = model.processor.pack(_examples(model, make_clip))
    seen: list[torch.dtype] = []
    attention = model.lm.model.layers[0].self_attn
    attention.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = compute_loss(model, packed, chunk_tokens=16)
    assert seen == [torch.float32]  # attention's output: computed in float32 (bf16 q/k/v went in)
    full, _ = compute_loss(model, packed, chunk_tokens=16)
    assert loss.item() == pytest.approx(full.item(), rel=0.02)


class _AttentionDtypes(TorchFunctionMode):
    """Records the query dtype of every SDPA call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_an_lm_in_bf16_attends_packed_rows_in_float32_and_gets_bf16_back(make_clip):
    model = tiny("llama").train()
    assert use_packed_attention(model.lm)
    packed = model.processor.pack(_examples(model, make_clip))
    full, _ = compute_loss(model, packed, chunk_tokens=16)
    model.lm.to(torch.bfloat16)  # no autocast: the LM computes in bf16 itself
    out: list[torch.dtype] = []
    model.lm.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda module, args: out.append(args[0].dtype))
    with _AttentionDtypes() as attention:
        loss, _ = compute_loss(model, packed, chunk_tokens=16)
    # The encoder's two layers, then each of the 3 examples in each of the LM's two: bf16 q/k/v went in.
    assert len(attention.seen) == 2 + 3 * 2 and set(attention.seen) == {torch.float32}
    assert out == [torch.bfloat16]  # and o_proj, a bf16 layer, gets its own dtype
    assert loss.item() == pytest.approx(full.item(), rel=0.02)


def test_the_dense_mask_of_a_packed_row_is_block_diagonal_and_causal():
    mask = block_causal_mask(torch.tensor([2, 3]), torch.float32, torch.device("cpu"))
    allowed = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert mask.shape == (1, 1, 5, 5)
    assert torch.equal(mask[0, 0] == 0, allowed)
    assert torch.all(mask[0, 0][~allowed] == torch.finfo(torch.float32).min)
