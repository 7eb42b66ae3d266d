"""Chunked losses equal the full-logits ones in value and gradient, and keep far less for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from voxtune.train.losses import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    chunked_kl_divergence,
    kl_divergence,
    select_predictions,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _head_inputs(*, dtype=torch.float32, batch=2, length=13, dim=16, vocab=40, bias=False):
    """Leaf hidden [B, L, D], weight [V, D], bias [V] | None, and labels [B, L] that look like a
    speech prompt: an unscored prefix of varying length, then scored answer tokens."""
    hidden = torch.randn(batch, length, dim, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, dim) / dim**0.5).to(dtype).requires_grad_()
    lm_bias = torch.randn(vocab, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(vocab, (batch, length))
    for row in range(batch):
        labels[row, : 3 + 2 * row] = IGNORE_INDEX  # prompt positions
    labels[0, -2] = IGNORE_INDEX  # a hole inside the answer, as packing or padding leaves
    return hidden, weight, lm_bias, labels


def _full_cross_entropy(hidden, weight, labels, *, bias=None, softcap=None, reduction="mean"):
    """What a Hugging Face `*ForCausalLM` computes: all logits, upcast, shifted, one cross-entropy."""
    logits = F.linear(hidden, weight, bias).float()  # [B, L, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def _value_and_grads(loss_fn, *leaves):
    """The loss and its gradients with respect to `leaves` (Nones skipped)."""
    leaves = [leaf for leaf in leaves if leaf is not None]
    loss = loss_fn()
    return loss.detach(), torch.autograd.grad(loss, leaves)


# ---- chunked cross-entropy -----------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("row_multiple", [1, 16], ids=lambda m: f"rows{m}")
def test_chunked_cross_entropy_matches_full_logits(chunk_tokens, bias, softcap, row_multiple):
    hidden, weight, lm_bias, labels = _head_inputs(bias=bias)
    want, want_grads = _value_and_grads(
        lambda: _full_cross_entropy(hidden, weight, labels, bias=lm_bias, softcap=softcap), hidden, weight, lm_bias
    )
    got, got_grads = _value_and_grads(
        lambda: chunked_cross_entropy(
            hidden,
            weight,
            labels,
            chunk_tokens=chunk_tokens,
            lm_head_bias=lm_bias,
            logit_softcap=softcap,
            row_multiple=row_multiple,  # 16: zero rows added, which count for nothing
        ),
        hidden,
        weight,
        lm_bias,
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    names = ["hidden", "weight", "bias"][: len(got_grads)]  # no bias, no bias gradient
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")
    # Positions that predict nothing get exactly no gradient.
    assert (got_grads[0][labels.roll(-1, dims=1) == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
def test_chunked_cross_entropy_in_bfloat16(softcap):
    hidden, weight, lm_bias, labels = _head_inputs(dtype=torch.bfloat16, bias=True, dim=32, vocab=300)
    want, want_grads = _value_and_grads(
        lambda: _full_cross_entropy(hidden, weight, labels, bias=lm_bias, softcap=softcap), hidden, weight, lm_bias
    )
    got, got_grads = _value_and_grads(
        lambda: chunked_cross_entropy(
            hidden, weight, labels, chunk_tokens=5, lm_head_bias=lm_bias, logit_softcap=softcap
        ),
        hidden,
        weight,
        lm_bias,
    )
    assert got.dtype == torch.float32  # the softmax ran in float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=2e-3)


def test_chunked_cross_entropy_sum_reduction():
    hidden, weight, _, labels = _head_inputs()
    want, want_grads = _value_and_grads(
        lambda: _full_cross_entropy(hidden, weight, labels, reduction="sum"), hidden, weight
    )
    got, got_grads = _value_and_grads(
        lambda: chunked_cross_entropy(hidden, weight, labels, chunk_tokens=4, reduction="sum"), hidden, weight
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_chunked_cross_entropy_with_nothing_scored_is_zero_not_nan():
    hidden, weight, _, labels = _head_inputs()
    loss = chunked_cross_entropy(hidden, weight, torch.full_like(labels, IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()  # still on the graph, so a step with no answer tokens is harmless
    for grad in (hidden.grad, weight.grad):
        assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_a_frozen_head_gets_no_gradient_and_hidden_still_does(bias, softcap):
    """A frozen head (LoRA) takes the path that computes the rows' gradient in the forward
    pass; scaled losses (accumulation weights) must scale it."""
    hidden, weight, lm_bias, labels = _head_inputs(bias=bias)
    frozen, frozen_bias = weight.detach(), lm_bias.detach() if bias else None
    (
        3
        * chunked_cross_entropy(hidden, frozen, labels, chunk_tokens=3, lm_head_bias=frozen_bias, logit_softcap=softcap)
    ).backward()
    _, (want,) = _value_and_grads(
        lambda: 3 * _full_cross_entropy(hidden, frozen, labels, bias=frozen_bias, softcap=softcap), hidden
    )
    assert frozen.grad is None
    torch.testing.assert_close(hidden.grad, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [("llama", {}), ("gemma2", {"final_logit_softcapping": 2.0, "head_dim": 8})],
    ids=["llama", "gemma2_softcap"],
)
def test_chunked_cross_entropy_matches_a_hugging_face_models_own_loss(model_type, extra):
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        **extra,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(300, (2, 17))
    labels = input_ids.clone()
    labels[:, :6] = IGNORE_INDEX  # the prompt
    labels[1, -3:] = IGNORE_INDEX  # right padding

    want = model(input_ids, labels=labels).loss
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    hidden = model.model(input_ids).last_hidden_state  # [B, L, D], after the final norm
    softcap = getattr(config, "final_logit_softcapping", None)
    got = chunked_cross_entropy(hidden, model.lm_head.weight, labels, chunk_tokens=4, logit_softcap=softcap)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _saved_bytes(loss_fn) -> tuple[int, torch.Tensor]:
    """Bytes autograd holds for backward while building `loss_fn()`'s graph, each storage counted
    once (nll_loss saves the very log-probabilities log_softmax saved), and the loss."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    return sum(storages.values()), loss


def test_chunked_cross_entropy_saves_a_fraction_of_what_full_logits_save():
    vocab, dim, scored = 50_000, 64, 4096
    hidden = torch.randn(2, 3000, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) / dim**0.5).requires_grad_()
    labels = torch.full((2, 3000), IGNORE_INDEX)
    labels[:, -scored // 2 :] = torch.randint(vocab, (2, scored // 2))  # an answer after a long prompt

    chunked, loss = _saved_bytes(lambda: chunked_cross_entropy(hidden, weight, labels, chunk_tokens=1024))
    loss.backward()  # and backward runs within that
    assert torch.isfinite(hidden.grad).all()
    # The fairest full-logits baseline already gathers the scored rows; a model's own loss,
    # projecting all 6000 positions, keeps more still.
    rows, targets = select_predictions(hidden.detach(), labels)
    assert rows.shape == (scored, dim)
    full, _ = _saved_bytes(lambda: F.cross_entropy(F.linear(rows, weight).float(), targets))
    print(f"saved for backward: chunked {chunked / 2**20:.1f} MiB, full logits {full / 2**20:.1f} MiB")
    assert full >= scored * vocab * 4  # the [N, V] float32 log-probabilities
    assert chunked < full / 10
    assert chunked < 2 * (scored * dim + vocab * dim) * 4  # O(N*D + V*D)


def test_bad_arguments_are_refused():
    hidden, weight, _, labels = _head_inputs()
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="row_multiple"):
        chunked_cross_entropy(hidden, weight, labels, row_multiple=0)
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="vocabulary"):
        kl_divergence(torch.randn(3, 40), torch.randn(3, 41))
    with pytest.raises(ValueError, match="temperature"):
        kl_divergence(torch.randn(3, 40), torch.randn(3, 40), temperature=0)


# ---- distillation KL -----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["t1", "t2"])
def test_kl_divergence_is_torchs_kl_between_the_softmaxes(temperature):
    student, teacher = torch.randn(9, 40), torch.randn(9, 40)
    want = F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1), reduction="batchmean"
    )
    torch.testing.assert_close(kl_divergence(student, teacher, temperature=temperature), want, rtol=1e-5, atol=0)
    # KL(teacher || student), not the other way round.
    assert not torch.allclose(kl_divergence(teacher, student), kl_divergence(student, teacher))


def test_kl_divergence_is_zero_for_equal_distributions_and_for_no_positions():
    logits = torch.randn(5, 40, dtype=torch.bfloat16)
    assert kl_divergence(logits, logits.clone()).abs().item() < 1e-6
    shifted = logits.float() + 3.0  # a shift leaves the softmax alone (added in float32: bfloat16 would round)
    assert kl_divergence(logits.float(), shifted).abs().item() < 1e-6
    assert kl_divergence(torch.empty(0, 40), torch.empty(0, 40)).item() == 0.0


def test_kl_divergence_sends_gradient_only_to_the_student():
    student = torch.randn(6, 40, requires_grad=True)
    teacher = torch.randn(6, 40, requires_grad=True)
    kl_divergence(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000], ids=lambda c: f"chunk{c}")
def test_chunked_kl_divergence_matches_the_full_logits(chunk_tokens, softcap):
    hidden, weight, lm_bias, _ = _head_inputs(bias=True)
    rows = hidden.detach()[:, :10].reshape(-1, hidden.shape[-1]).requires_grad_()  # [N, D]
    teacher = torch.randn(rows.shape[0], weight.shape[0], requires_grad=True)  # [N, V]

    def full():
        logits = F.linear(rows, weight, lm_bias)
        logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
        return kl_divergence(logits, teacher, temperature=1.5)

    want, want_grads = _value_and_grads(full, rows, weight, lm_bias)
    got, got_grads = _value_and_grads(
        lambda: chunked_kl_divergence(
            rows,
            weight,
            teacher,
            chunk_tokens=chunk_tokens,
            lm_head_bias=lm_bias,
            logit_softcap=softcap,
            temperature=1.5,
        ),
        rows,
        weight,
        lm_bias,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    chunked_kl_divergence(rows, weight, teacher, chunk_tokens=chunk_tokens).backward()
    assert teacher.grad is None and rows.grad is not None


def test_select_predictions_lines_up_a_speech_prompt_with_its_transcript_prompt():
    answer = torch.tensor([7, 8, 9, 2])
    # The same answer after a 10-position audio prompt (student) and a 4-token transcript (teacher).
    student_labels = torch.cat([torch.full((10,), IGNORE_INDEX), answer])[None]  # [1, 14]
    teacher_labels = torch.cat([torch.full((4,), IGNORE_INDEX), answer])[None]  # [1, 8]
    positions_s, targets_s = select_predictions(torch.arange(14)[None], student_labels)
    positions_t, targets_t = select_predictions(torch.arange(8)[None], teacher_labels)
    assert targets_s.tolist() == targets_t.tolist() == answer.tolist()
    # The position before each answer token predicts it, on both sides.
    assert positions_s.tolist() == [9, 10, 11, 12] and positions_t.tolist() == [3, 4, 5, 6]
