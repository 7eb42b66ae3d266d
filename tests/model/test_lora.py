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


def test_the_same_input_twice_computes_afresh():
    # A group holds its product only until every sibling took its slice; the same tensor in
    # the next forward gets a new product (and a graph that backward has not freed).
    linked, peft_only = _adapted()
    embeddings = linked.get_input_embeddings()(torch.randint(0, 100, (1, 6))).detach().requires_grad_()
    for lm in (linked, peft_only):
        for _ in range(2):
            lm(inputs_embeds=embeddings).logits.sum().backward()
    peft_grads = dict(peft_only.named_parameters())
    for name, parameter in linked.named_parameters():
        if parameter.grad is not None:
            # Summed logits make large gradients: the products' order moves them by ~1e-6.
            torch.testing.assert_close(parameter.grad, peft_grads[name].grad, rtol=1e-4, atol=1e-4)


class _CrossAttention(nn.Module):
    """q reads one input, k and v another: named like siblings, but not."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))

    def forward(self, x, memory):
        return self.q_proj(x) * self.k_proj(memory) + self.v_proj(memory)


def test_layers_reading_different_inputs_unlink_and_compute_alike():
    torch.manual_seed(0)
    linked = _with_lora(_CrossAttention(), ["q_proj", "k_proj", "v_proj"], {"r": 2, "lora_alpha": 4})
    for name, parameter in linked.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter)
    peft_only = copy.deepcopy(linked)
    unlink_siblings(peft_only)
    x, memory = torch.randn(3, 8), torch.randn(3, 8)
    for _ in range(2):
        torch.testing.assert_close(linked(x, memory), peft_only(x, memory))
    q_proj = linked.get_submodule("base_model.model.q_proj")
    assert q_proj.group is not None and q_proj.group.layers == [q_proj]  # on its own now


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


def test_without_gradients_the_layers_are_peft_and_hold_nothing():
    linked, peft_only = _adapted()
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(linked(input_ids=ids).logits, peft_only(input_ids=ids).logits)
    q_proj = linked.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert q_proj.group is not None and len(q_proj.group.layers) == 3 and q_proj.group._input is None


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
