"""Projector: encoder frames -> LM embeddings, k frames stacked into one audio token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """Stack `stack` consecutive encoder frames, then RMSNorm -> SwiGLU MLP, with one more
    RMSNorm: after the MLP (`norm_mid=False`), or between its two layers (`norm_mid=True`).

    Stacking sets the audio token rate (25 encoder frames/s stacked by 2 is 12.5 tokens/s); the
    second norm keeps audio embeddings at a scale the LM can read. The two layouts are
    Ultravox's: v0.4 (norm after) and v0.5+ (norm in the middle), the one vLLM and llama.cpp
    both run, so a model with it exports exactly to either.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, stack: int, hidden: int, norm_mid: bool = False, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.stack = stack
        self.norm_in = nn.RMSNorm(in_dim * stack, eps=eps)
        self.gate_up = nn.Linear(in_dim * stack, 2 * hidden, bias=False)
        self.norm_mid = nn.RMSNorm(hidden, eps=eps) if norm_mid else None
        self.down = nn.Linear(hidden, out_dim, bias=False)
        self.norm_out = None if norm_mid else nn.RMSNorm(out_dim, eps=eps)

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Audio tokens for each clip's encoder frame count: ceil(frames / stack)."""
        return (frames + self.stack - 1) // self.stack

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """`frames` [B, T, D_enc] -> [B, ceil(T / stack), D_lm]; a partial last group is zero-padded."""
        batch, length, dim = frames.shape
        pad = -length % self.stack
        if pad:
            frames = F.pad(frames, (0, 0, 0, pad))
        stacked = frames.reshape(batch, (length + pad) // self.stack, self.stack * dim)  # [B, T/k, k*D]
        gate, up = self.gate_up(self.norm_in(stacked)).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        if self.norm_mid is not None:
            hidden = self.norm_mid(hidden)
        out = self.down(hidden)
        return out if self.norm_out is None else self.norm_out(out)
