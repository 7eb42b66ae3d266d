"""Attention for packed rows that runs example by example: no [L, L] mask is built or read,
and the cost is sum(l_i^2) instead of L^2 for a row of examples of lengths l_i.

Registered with transformers' attention interface (its documented extension point) under
`PACKED_ATTENTION` the first time `use_packed_attention` is called, never at import. For a
packed batch, `SpeechLM.lm_inputs` then gives the LM the examples' cumulative lengths as
`cu_seq_lens_q` / `cu_seq_lens_k` (the names flash-attention's variable-length kernels take, so
an LM on `flash_attention_2` reads the same batch natively) and an all-ones padding mask, for
which transformers builds no [L, L] mask; attention runs `scaled_dot_product_attention` once
per example. Every other call (generation with a KV cache, padded batches) goes to
transformers' own SDPA function with the mask transformers builds, so the model computes
exactly what it did before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "voxtune_packed"
# Implementations that take `cu_seq_lens_*` instead of a mask for a packed row.
VARLEN_ATTENTION = (PACKED_ATTENTION, "flash_attention_2", "flash_attention_3")


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An attention function in transformers' interface: query [B, H, L, Dh], key and value
    [B, H_kv, L, Dh] -> ([B, L, H, Dh], None). With `cu_seq_lens_q` (a packed row) the mask
    is not read; each example attends causally to itself (within `sliding_window` if set)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {query.shape[0]}")
    if kwargs.get("softcap") is not None:
        raise ValueError("packed attention runs on SDPA, which has no logit soft-capping; use eager attention")
    autocasting = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if query.device.type == "cpu" and (autocasting or query.dtype == torch.bfloat16):
        # On the CPU, SDPA's bf16 backward took 4.4x its float32 time (2 cores, torch 2.13):
        # there attention runs in float32, and the next matmul (o_proj) casts back under
        # autocast; an LM computing in bf16 itself gets its dtype back here.
        with torch.autocast("cpu", enabled=False):
            output, weights = packed_sdpa_forward(
                module, query.float(), key.float(), value.float(), attention_mask, dropout, scaling, **kwargs
            )
        return (output if autocasting else output.to(query.dtype)), weights
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    pieces = []
    bounds = bounds.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        if window is not None and b - a > window:
            i = torch.arange(b - a, device=query.device)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)  # [l, l], True = may attend
            pieces.append(
                F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=p, scale=scaling, enable_gqa=gqa)
            )
        else:
            pieces.append(
                F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa)
            )
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None  # [1, H, L, Dh] -> [1, L, H, Dh]


def use_packed_attention(lm: Any) -> bool:
    """Switch `lm` (a transformers causal LM; `SpeechLM.base_lm()` under peft) from SDPA to the
    per-example packed attention; returns whether it was switched (only SDPA models are)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if lm.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
    # The same masks as SDPA, for the calls that are not packed rows.
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    lm.set_attn_implementation(PACKED_ATTENTION)
    return True


def varlen_inputs(sequence_lengths: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """The keyword inputs that describe a packed row of examples of `sequence_lengths` [n]."""
    bounds = torch.zeros(len(sequence_lengths) + 1, dtype=torch.int32)
    bounds[1:] = torch.cumsum(sequence_lengths, 0)
    bounds = bounds.to(device)
    longest = int(sequence_lengths.max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def block_causal_mask(sequence_lengths: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive [1, 1, L, L] mask of a packed row of examples of `sequence_lengths` [n]:
    0 where a position may attend (itself and earlier positions of its own example), the
    dtype's lowest value elsewhere. Additive, because every attention implementation reads
    that the same way (eager ones misread booleans); made on `device`, where it is used."""
    lengths = sequence_lengths.to(device)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)  # [L]: example of each
    length = segment.shape[0]
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril_()
    allowed &= segment[:, None] == segment[None, :]
    mask = torch.zeros(length, length, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
