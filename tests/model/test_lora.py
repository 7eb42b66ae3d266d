"""LoRA layers whose siblings share one down-projection: the same outputs and gradients as
peft's own layers, one product per group, and peft's adapter format."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn
from torch.overrides import TorchFunctionMode

from voxtune.model import tiny
from voxtune.model.lora import SharedInputLoraLinear, link_siblings, unlink_siblings
from voxtune.model.speech_lm import _with_lora

R = 4


def _adapted(family: str = "llama", **settings):
    """A tiny LM with LoRA on its family's layers (B random, so the adapters change the
    outputs), and a copy of it computing with peft's own forward."""
    model = tiny(family, seed=0)
    model.add_adapters(list(model.family.lora_targets), [], r=R, lora_alpha=2 * R, **settings)
    torch.manual_seed(1)
    for name, parameter in model.lm.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)
    peft_only = copy.deepcopy(model.lm)
    unlink_siblings(peft_only)
    return model.lm, peft_only


def _loss_and_grads(lm, ids):
    lm.zero_grad()
    loss = lm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


class _Linears(TorchFunctionMode):
    """Records the weight shape of every F.linear call."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_linked_layers_train_like_peft(family):
    linked, peft_only = _adapted(family)
    ids = torch.randint(0, 100, (2, 12))
    loss, grads = _loss_and_grads(linked, ids)
    peft_loss, peft_grads = _loss_and_grads(peft_only, ids)
    torch.testing.assert_close(loss, peft_loss)
    assert grads.keys() == peft_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], msg=name)


def test_siblings_share_one_down_projection():
    linked, peft_only = _adapted()
    config = linked.get_base_model().config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    ids = torch.randint(0, 100, (1, 8))
    counts = {}
    for name, lm in (("linked", linked), ("peft", peft_only)):
        with _Linears() as seen:
            lm(input_ids=ids).logits.sum().backward()
        counts[name] = seen.shapes
    # One [3r, hidden] product for q/k/v and one [2r, hidden] for gate/up, per decoder layer;
    # o_proj and down_proj each keep their own.
    assert counts["linked"].count((3 * R, hidden)) == layers
    assert counts["linked"].count((2 * R, hidden)) == layers
    assert counts["linked"].count((R, hidden)) == layers  # o_proj
    assert counts["peft"].count((R, hidden)) == 6 * layers  # q, k, v, o, gate, up: one each
    assert len(counts["peft"]) - len(counts["linked"]) == 3 * layers


class _Attention(nn.Module):
    """q/k/v and an output layer; q reads `x`, k and v read `memory` (itself when None)."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x, memory=None):
        memory = x if memory is None else memory
        return self.o_proj(self.q_proj(x) * self.k_proj(memory) + self.v_proj(memory))


def _linked_and_peft(module: nn.Module, targets=("q_proj", "k_proj", "v_proj", "o_proj"), **settings):
    """`module` with LoRA (B random) on `targets`, linked, and a copy on peft's forward."""
    torch.manual_seed(0)
    linked = _with_lora(module, list(targets), {"r": 2, "lora_alpha": 4, **settings})
    for name, parameter in linked.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.5)
    peft_only = copy.deepcopy(linked)
    unlink_siblings(peft_only)
    return linked, peft_only


def _assert_same_grads(linked, peft_only):
    grads = {n: p.grad for n, p in peft_only.named_parameters() if p.grad is not None}
    assert grads and grads.keys() == {n for n, p in linked.named_parameters() if p.grad is not None}
    for name, parameter in linked.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, grads[name], msg=name)


def test_the_same_input_again_gets_a_new_product():
    # A group holds its product only until every sibling took its slice: the same tensor in
    # the next forward, or the same tensor changed in place, gets a new one (and a graph that
    # backward has not freed).
    linked, peft_only = _linked_and_peft(_Attention())
    x = torch.randn(3, 8)
    for model in (linked, peft_only):
        for _ in range(2):
            model(x).sum().backward()
        x.mul_(2)
        model(x).sum().backward()
        x.div_(2)
    _assert_same_grads(linked, peft_only)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_siblings_reading_different_inputs_compute_like_peft(checkpointed):
    # Cross-attention: q reads the decoder, k and v the encoder. Each mismatch makes a new
    # product for the group; under activation checkpointing the recomputed layers too.
    linked, peft_only = _linked_and_peft(_Attention())
    x, memory = torch.randn(3, 8), torch.randn(5, 8)[:3]
    for model in (linked, peft_only):
        for _ in range(2):
            if checkpointed:
                out = torch.utils.checkpoint.checkpoint(model, x, memory, use_reentrant=False)
            else:
                out = model(x, memory)
            out.sum().backward()
    torch.testing.assert_close(linked(x, memory), peft_only(x, memory))
    _assert_same_grads(linked, peft_only)


def test_siblings_of_different_ranks_take_their_own_columns():
    linked, peft_only = _linked_and_peft(_Attention(), rank_pattern={"k_proj": 3, "v_proj": 1})
    with _Linears() as seen:
        linked(torch.randn(4, 8)).sum().backward()
    assert (6, 8) in seen.shapes  # q (2) + k (3) + v (1) in one product
    x = torch.randn(4, 8)
    for model in (linked, peft_only):
        model.zero_grad()
        model(x).sum().backward()
    _assert_same_grads(linked, peft_only)


def test_a_merged_or_biased_sibling_leaves_the_others_computing_alone():
    linked, peft_only = _linked_and_peft(_Attention())
    for model in (linked, peft_only):
        model.get_submodule("base_model.model.q_proj").merge()
    x = torch.randn(3, 8)
    for model in (linked, peft_only):
        model(x).sum().backward()
    _assert_same_grads(linked, peft_only)
    # A LoRA bias is scaled with B's output in peft: those layers run peft's forward.
    biased, peft_biased = _linked_and_peft(_Attention(), lora_bias=True)
    torch.testing.assert_close(biased(x), peft_biased(x))
    # Switched off, with gradients on: the base layers alone.
    fresh, _ = _linked_and_peft(_Attention())
    m = fresh.get_base_model()
    base = m.o_proj.base_layer(m.q_proj.base_layer(x) * m.k_proj.base_layer(x) + m.v_proj.base_layer(x))
    assert not torch.allclose(fresh(x), base)
    with fresh.disable_adapter():
        torch.testing.assert_close(fresh(x), base)


def test_siblings_with_dropout_compute_alone_with_peft_masks():
    linked, peft_only = _adapted(lora_dropout=0.5)
    q_proj = linked.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, SharedInputLoraLinear) and q_proj.group.layers == [q_proj]
    ids = torch.randint(0, 100, (1, 8))
    torch.manual_seed(3)
    loss, _ = _loss_and_grads(linked, ids)
    torch.manual_seed(3)
    peft_loss, _ = _loss_and_grads(peft_only, ids)
    torch.testing.assert_close(loss, peft_loss)  # the same masks, drawn in the same order


def test_bf16_base_with_float32_adapters_stays_close_to_peft():
    linked, peft_only = _adapted()
    for lm in (linked, peft_only):
        for parameter in lm.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    ids = torch.randint(0, 100, (2, 12))
    loss, grads = _loss_and_grads(linked, ids)
    peft_loss, peft_grads = _loss_and_grads(peft_only, ids)
    # The update is added in bf16 (peft adds in float32, then rounds): one more rounding.
    torch.testing.assert_close(loss, peft_loss, rtol=1e-2, atol=1e-2)
    assert {g.dtype for g in grads.values()} == {torch.float32}
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=0.1, atol=2e-3, msg=name)


def test_without_gradients_the_layers_run_peft_forward():
    linked, peft_only = _adapted()
    hidden = linked.get_base_model().config.hidden_size
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad(), _Linears() as seen:
        logits = linked(input_ids=ids).logits
    torch.testing.assert_close(logits, peft_only(input_ids=ids).logits)
    assert (3 * R, hidden) not in seen.shapes and (R, hidden) in seen.shapes  # each layer its own A


def test_adapters_save_as_peft_and_merge_to_what_they_compute(tmp_path):
    model = tiny("llama", seed=0)
    model.add_adapters(list(model.family.lora_targets), [], r=R, lora_alpha=2 * R)
    for name, parameter in model.lm.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)
    ids = torch.randint(0, 100, (1, 8))
    expected = model.lm(input_ids=ids).logits.detach()  # with gradients: the linked path
    model.save_adapters(tmp_path)
    # A plain peft load of the saved adapters, on a fresh copy of the base LM.
    loaded = PeftModel.from_pretrained(tiny("llama", seed=0).lm, tmp_path)
    assert not any(isinstance(m, SharedInputLoraLinear) for m in loaded.modules())
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    model.merge_adapters()
    assert not any(isinstance(m, SharedInputLoraLinear) for m in model.lm.modules())
    torch.testing.assert_close(model.lm(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_link_counts_the_shared_groups():
    linked, _ = _adapted()
    layers = linked.get_base_model().config.num_hidden_layers
    assert link_siblings(linked) == 2 * layers  # q/k/v and gate/up in each decoder layer
