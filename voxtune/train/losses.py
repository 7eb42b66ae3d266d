"""Losses over a large-vocabulary LM head that never hold the full logits.

The logits are the largest activation in LM fine-tuning: [N, V] float32 for N scored positions, e.g.
16k tokens x 152k vocabulary = 10 GB, kept alive for backward by the softmax. These losses take the
final hidden states and the head's weight instead, score `chunk_tokens` rows at a time, keep only a
few numbers per row for backward and recompute each chunk's logits there. The price is one extra
[C, D] x [D, V] matmul per chunk.

- Only scored positions are projected: a speech prompt is mostly audio and instruction positions
  whose labels are -100, so rows are gathered before any logits exist.
- Softmax, log-sum-exp and the softcap run in float32 whatever the hidden dtype; the matmuls run
  in the inputs' dtype, as `lm_head` would (autocast does not reach inside a custom Function).
- The losses come back as float32 scalars.

Shape letters: B batch, L sequence, N scored positions, C rows in a chunk, D model width,
V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def select_predictions(outputs: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """The rows of `outputs` that predict a scored label, and those labels.

    Hugging Face's convention: the output at position t predicts `labels[:, t + 1]`, so the last
    position predicts nothing and the first label is never scored.

    Args:
        outputs: [B, L, ...] per-position outputs, hidden states [B, L, D] or logits [B, L, V].
        labels: [B, L] token ids, `ignore_index` where nothing is scored.
        ignore_index: the label of unscored positions.

    Returns:
        rows [N, ...] and targets [N], in reading order (batch row, then position), so that two
        sequences with the same scored tokens (a speech prompt and its transcript) give rows
        that line up one to one.
    """
    if outputs.shape[:2] != labels.shape:
        raise ValueError(f"outputs {tuple(outputs.shape)} and labels {tuple(labels.shape)} differ in [B, L]")
    targets = labels[:, 1:]  # [B, L-1]
    scored = targets != ignore_index  # [B, L-1]
    return outputs[:, :-1][scored], targets[scored]


def chunked_cross_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    chunk_tokens: int = 1024,
    lm_head_bias: Tensor | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Literal["mean", "sum"] = "mean",
    row_multiple: int = 1,
) -> Tensor:
    """Next-token cross-entropy of `hidden @ lm_head_weight.T`, a chunk of rows at a time.

    Equals `F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
    ignore_index=ignore_index)` (the loss of a Hugging Face `*ForCausalLM` given `labels`), in
    value and gradients, without ever holding more than [chunk_tokens, V] logits.

    Args:
        hidden: [B, L, D] final hidden states (after the final norm), e.g.
            `lm.model(...).last_hidden_state`.
        lm_head_weight: [V, D] the output projection's weight (`lm.lm_head.weight`).
        labels: [B, L] token ids, `ignore_index` where nothing is scored; not shifted.
        chunk_tokens: rows scored together; peak extra memory is a few [chunk_tokens, V] float32
            buffers.
        lm_head_bias: [V] the projection's bias, if it has one.
        logit_softcap: Gemma 2's `final_logit_softcapping`: logits become `cap * tanh(logits / cap)`.
        ignore_index: the label of unscored positions.
        reduction: "mean" over scored tokens (0 when there are none) or "sum".
        row_multiple: the scored rows are made up to a multiple of this with zero rows, which
            add nothing to the loss or its gradients: the head's matmuls then come in fewer
            shapes (on the CPU, bf16 kernels are built and cached per shape).

    Returns:
        A float32 scalar.

    Raises:
        ValueError: on mismatched shapes, a `chunk_tokens` or `row_multiple` below 1, or an
            unknown reduction.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if row_multiple < 1:
        raise ValueError(f"row_multiple must be at least 1, got {row_multiple}")
    _check_head(hidden, lm_head_weight, lm_head_bias, chunk_tokens)
    rows, targets = select_predictions(hidden, labels, ignore_index=ignore_index)  # [N, D], [N]
    scored = rows.shape[0]
    extra = -scored % row_multiple
    if extra and scored:
        rows = torch.cat([rows, rows.new_zeros(extra, rows.shape[1])])  # [N', D], N' a multiple
        targets = torch.cat([targets, targets.new_zeros(extra)])  # [N'], any valid id
    total = _LinearCrossEntropy.apply(rows, lm_head_weight, lm_head_bias, targets, logit_softcap, chunk_tokens, scored)
    # Dividing by at least 1 makes a batch with nothing scored a 0 loss that still backpropagates.
    return total / max(scored, 1) if reduction == "mean" else total


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) per position, averaged over positions: the distillation loss.

    Ultravox's response-KL: the speech model (student, prompted with audio) is pulled towards the
    next-token distribution the text LM (teacher, prompted with the transcript) gives for the same
    answer tokens. Rows must line up: take both with `select_predictions` on each side's labels,
    which mark the same answer tokens (see `chunked_kl_divergence`).

    Args:
        student_logits: [N, V] (or [..., V]) logits at the positions predicting the answer tokens.
        teacher_logits: the teacher's, same shape; detached here, so no gradient reaches it.
        temperature: both distributions are softened by it. The loss is not rescaled by
            temperature**2; scale its weight if mixing it with cross-entropy at T != 1.

    Returns:
        A float32 scalar, 0 for N = 0.
    """
    _check_kl(student_logits.shape, teacher_logits.shape, temperature)
    student = student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature  # [N, V]
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).float() / temperature  # [N, V]
    # kl_div's target form uses xlogy, so tokens the teacher gives probability 0 add 0, not NaN.
    total = F.kl_div(F.log_softmax(student, dim=-1), F.softmax(teacher, dim=-1), reduction="sum")
    return total / max(student.shape[0], 1)


def chunked_kl_divergence(
    hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_logits: Tensor,
    *,
    chunk_tokens: int = 1024,
    lm_head_bias: Tensor | None = None,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """`kl_divergence(softcap(hidden @ lm_head_weight.T + bias), teacher_logits)`, a chunk at a time.

    The student's [N, V] logits are never held; the teacher's are an input (computed under
    `torch.no_grad`, they carry no graph, and the teacher can project only its N selected rows).

    Aligning positions, in the training loop::

        rows, targets = select_predictions(student_hidden, batch["labels"])  # [N, D], [N]
        with torch.no_grad():
            teacher_rows, teacher_targets = select_predictions(teacher_hidden, text_batch["labels"])
            teacher_logits = teacher.lm_head(teacher_rows)  # [N, V]
        assert torch.equal(targets, teacher_targets)  # same answer tokens, same order
        loss = chunked_kl_divergence(rows, lm.lm_head.weight, teacher_logits)

    Row i on both sides is then the position whose output predicts the i-th answer token. (Ultravox
    indexes logits at `labels != -100` unshifted, which also lines up but scores the token after
    each answer token rather than the answer tokens themselves.)

    Args:
        hidden: [N, D] the student's final hidden states at the selected positions.
        lm_head_weight: [V, D] the student's output projection.
        teacher_logits: [N, V] the teacher's logits at the matching positions; no gradient.
        chunk_tokens: rows scored together.
        lm_head_bias: [V] the projection's bias, if it has one.
        logit_softcap: the student's final logit softcap (Gemma 2), applied before temperature.
        temperature: as in `kl_divergence`.

    Returns:
        A float32 scalar, 0 for N = 0.
    """
    _check_head(hidden, lm_head_weight, lm_head_bias, chunk_tokens, rows_only=True)
    _check_kl(torch.Size((hidden.shape[0], lm_head_weight.shape[0])), teacher_logits.shape, temperature)
    total = _LinearKL.apply(
        hidden, lm_head_weight, lm_head_bias, teacher_logits.detach(), logit_softcap, temperature, chunk_tokens
    )
    return total / max(hidden.shape[0], 1)


# ---- autograd functions --------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `rows @ weight.T (+ bias)` against `targets`, over the first
    `scored` rows (the others are padding: computed with, never counted).

    Saves the inputs (no copies) and one float32 log-sum-exp per row: O(N*D + V*D), nothing [N, V].
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, softcap, chunk_tokens, scored):
        lse = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)  # [N]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start, stop in _chunks(rows.shape[0], chunk_tokens):
            logits = _capped(_logits(rows[start:stop], weight, bias), softcap)  # [C, V] float32
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:stop, None]).squeeze(1)  # [C]
            total += (lse[start:stop] - picked)[: max(0, scored - start)].sum()
        ctx.save_for_backward(rows, weight, bias, targets, lse)
        ctx.softcap, ctx.chunk_tokens, ctx.scored = softcap, chunk_tokens, scored
        return total

    @staticmethod
    def backward(ctx, grad_total):
        rows, weight, bias, targets, lse = ctx.saved_tensors

        def grad_of_logits(start: int, stop: int, logits: Tensor) -> Tensor:
            # d/dlogits of (lse - logits[target]) = softmax - one_hot(target); built in place.
            grad = logits.sub_(lse[start:stop, None]).exp_()  # [C, V]
            grad[torch.arange(stop - start, device=grad.device), targets[start:stop]] -= 1
            grad[max(0, ctx.scored - start) :] = 0  # padding rows: no gradient
            return grad.mul_(grad_total)

        grads = _head_backward(ctx, rows, weight, bias, grad_of_logits)
        return *grads, None, None, None, None


class _LinearKL(torch.autograd.Function):
    """Summed KL(softmax(teacher / T) || softmax(softcap(rows @ weight.T + bias) / T)) over rows."""

    @staticmethod
    def forward(ctx, rows, weight, bias, teacher_logits, softcap, temperature, chunk_tokens):
        lse = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)  # [N], of student / T
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start, stop in _chunks(rows.shape[0], chunk_tokens):
            student = _capped(_logits(rows[start:stop], weight, bias), softcap).div_(temperature)  # [C, V]
            lse[start:stop] = torch.logsumexp(student, dim=-1)
            teacher = F.softmax(teacher_logits[start:stop].float() / temperature, dim=-1)  # [C, V]
            total += F.kl_div(student.sub_(lse[start:stop, None]), teacher, reduction="sum")
        ctx.save_for_backward(rows, weight, bias, teacher_logits, lse)
        ctx.softcap, ctx.temperature, ctx.chunk_tokens = softcap, temperature, chunk_tokens
        return total

    @staticmethod
    def backward(ctx, grad_total):
        rows, weight, bias, teacher_logits, lse = ctx.saved_tensors
        temperature = ctx.temperature

        def grad_of_logits(start: int, stop: int, logits: Tensor) -> Tensor:
            # d/dlogits of KL(p || softmax(logits / T)) = (softmax(logits / T) - p) / T.
            student = logits.div_(temperature).sub_(lse[start:stop, None]).exp_()  # [C, V]
            teacher = F.softmax(teacher_logits[start:stop].float() / temperature, dim=-1)  # [C, V]
            return student.sub_(teacher).mul_(grad_total / temperature)

        grads = _head_backward(ctx, rows, weight, bias, grad_of_logits)
        return *grads, None, None, None, None


# ---- helpers -------------------------------------------------------------------------------


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive slices of at most `size` rows covering `n`."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _logits(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """[C, D] rows -> float32 [C, V] logits; the matmul runs in the inputs' common dtype, like `lm_head`."""
    dtype = torch.promote_types(rows.dtype, weight.dtype)
    rows, weight = rows.to(dtype), weight.to(dtype)
    logits = rows @ weight.T if bias is None else torch.addmm(bias.to(dtype), rows, weight.T)  # [C, V]
    return logits.float()


def _capped(logits: Tensor, softcap: float | None) -> Tensor:
    """Gemma 2's `cap * tanh(logits / cap)`, in place on float32 `logits`."""
    return logits if softcap is None else logits.div_(softcap).tanh_().mul_(softcap)


def _head_backward(
    ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, grad_of_logits: Callable[[int, int, Tensor], Tensor]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for rows, weight and bias, recomputing each chunk's logits.

    `grad_of_logits(start, stop, capped)` turns a chunk's float32 (softcapped) logits into the
    loss's gradient with respect to them, and may do so in place.
    """
    need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
    dtype = torch.promote_types(rows.dtype, weight.dtype)
    matmul_weight = weight.to(dtype)  # cast once, not per chunk
    grad_rows = torch.empty(rows.shape, dtype=dtype, device=rows.device) if need_rows else None  # [N, D]
    # Accumulated over chunks in float32 so a bfloat16 head does not round every partial sum.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
    for start, stop in _chunks(rows.shape[0], ctx.chunk_tokens):
        chunk = rows[start:stop].to(dtype)  # [C, D]
        capped = _capped(_logits(chunk, matmul_weight, bias), ctx.softcap)  # [C, V] float32
        # d(cap * tanh(z / cap))/dz = 1 - tanh(z / cap)^2, read off the capped logits before
        # grad_of_logits overwrites them.
        slope = None if ctx.softcap is None else 1 - (capped / ctx.softcap).square()  # [C, V]
        grad = grad_of_logits(start, stop, capped)  # [C, V] float32
        if slope is not None:
            grad.mul_(slope)
        if grad_bias is not None:
            grad_bias += grad.sum(0)
        grad = grad.to(dtype)
        if grad_rows is not None:
            grad_rows[start:stop] = grad @ matmul_weight  # [C, D]
        if grad_weight is not None and dtype == torch.float32:
            grad_weight.addmm_(grad.T, chunk)  # [V, D], no [V, D] temporary
        elif grad_weight is not None:
            grad_weight += grad.T @ chunk  # [V, D]
    return (
        grad_rows.to(rows.dtype) if grad_rows is not None else None,
        grad_weight.to(weight.dtype) if grad_weight is not None else None,
        grad_bias.to(bias.dtype) if grad_bias is not None and bias is not None else None,  # no bias: no grad_bias
    )


def _check_head(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_tokens: int, *, rows_only: bool = False
) -> None:
    """Loud errors for shapes that would otherwise fail deep inside a chunk, or silently broadcast."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, not {chunk_tokens}")
    if hidden.dim() != (2 if rows_only else 3):
        raise ValueError(f"hidden must be {'[N, D]' if rows_only else '[B, L, D]'}, not {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight {tuple(weight.shape)} is not [V, {hidden.shape[-1]}]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"lm_head_bias {tuple(bias.shape)} is not [{weight.shape[0]}]")


def _check_kl(student: torch.Size, teacher: torch.Size, temperature: float) -> None:
    """Student and teacher logits must cover the same positions and vocabulary."""
    if student != teacher:
        raise ValueError(
            f"student {tuple(student)} and teacher {tuple(teacher)} logits differ; both need the same "
            "answer positions and vocabulary (slice off tokens only one side has, such as <|audio|>)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
