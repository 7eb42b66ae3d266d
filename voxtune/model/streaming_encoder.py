"""voxtune's own streaming audio encoder: log-mel frames in, 25 frames/s of features out.

Architecture choices:
- Two causal Conv1d layers (stride 2 each, left zero padding kernel-1, GELU after each) take
  100 mel frames/s to 25 output frames/s. Causal padding means an output frame never reads a
  later input frame, so right-padded batches and incremental input need no special care there.
- Pre-norm transformer layers: RMSNorm, multi-head self-attention with rotary position embedding
  on the absolute output-frame index, RMSNorm, GELU MLP. A final RMSNorm closes the stack.
- Block-causal attention: frame i belongs to chunk i // chunk_frames and sees every frame of its
  own chunk and of the `left_chunks` chunks before it, nothing later and nothing earlier. Frames
  see their whole own chunk, so an output is final once its chunk is complete; streaming then
  gives exactly the whole-clip result (see `StreamingEncoder.stream`).
- The window applies per layer, so the stack's receptive field reaches `layers * left_chunks`
  chunks back (as in Transformer-XL), while each layer's K/V cache holds only `left_chunks`
  chunks.
- Whole clips are attended chunk by chunk too: each query chunk meets a window of its own and
  the `left_chunks` previous chunks' keys (a strided view, see `_chunk_windows`), so time and
  memory grow linearly with the clip length, never as T' x T'.

Shape letters in comments: B batch, T frames, M mels, D dim, H heads, Hd head dim, C chunk frames,
N chunks (ceil(T' / C)), W window frames ((left_chunks + 1) * C).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MEL_FRAME_RATE",
    "StreamingEncoderConfig",
    "EncoderStreamState",
    "StreamingEncoder",
    "build_streaming_encoder",
]

# Input rate: voxtune.audio.features hops 160 samples at 16 kHz. Kept here as a number so that
# importing the model does not import the audio I/O stack.
MEL_FRAME_RATE = 100.0
_CONV_STRIDE = 2


@dataclass
class StreamingEncoderConfig:
    """Hyper-parameters of a `StreamingEncoder`; saved next to its weights.

    Attributes:
        n_mels: mel bins of the input features (M).
        dim: transformer width and output width (D).
        layers: transformer layers.
        heads: attention heads (H); `dim // heads` must be even for rotary embedding.
        mlp_ratio: MLP hidden width as a multiple of `dim`.
        conv_kernel: kernel size of both causal convolutions.
        chunk_frames: attention chunk size in output frames (4 at 25 frames/s is 160 ms).
        left_chunks: past chunks each chunk attends to, at every layer.
        rope_theta: rotary embedding base.
        norm_eps: RMSNorm epsilon.
    """

    n_mels: int = 80
    dim: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    conv_kernel: int = 3
    chunk_frames: int = 4
    left_chunks: int = 8
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        positive = ("n_mels", "dim", "layers", "heads", "conv_kernel", "chunk_frames")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.left_chunks < 0:
            raise ValueError(f"left_chunks must be at least 0, got {self.left_chunks}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim / heads must be an even integer, got dim {self.dim}, heads {self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, JSON-serialisable."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamingEncoderConfig:
        """Build from a dict such as `to_dict()` wrote; missing keys take their defaults.

        Raises:
            ValueError: `d` has keys that are not fields (named in the message), or a value is invalid.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown StreamingEncoderConfig keys: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class EncoderStreamState:
    """Everything `StreamingEncoder.stream` carries from one piece of input to the next.

    Attributes:
        conv_buffers: per conv, the input frames [B, C_in, t] not yet consumed; starts as
            kernel-1 zero frames (the causal left padding).
        kv_caches: per layer, rotated keys and values [B, H, t, Hd] of at most
            `left_chunks * chunk_frames` past frames.
        pending: conv output frames [B, t < chunk_frames, D] waiting for their chunk to complete.
        position: absolute output-frame index of `pending[:, 0]` (the rotary position).
        finished: set by `flush`; a finished state accepts no more input.
    """

    conv_buffers: list[torch.Tensor]
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    pending: torch.Tensor
    position: int = 0
    finished: bool = False

    @property
    def batch_size(self) -> int:
        return self.pending.shape[0]


def _chunk_windows(x: torch.Tensor, chunk_frames: int, left_chunks: int) -> torch.Tensor:
    """Each chunk's attention window: [..., T, E] -> [..., N, W, E], a strided view (no copy per window).

    Window n holds frames (n - left_chunks) * C .. (n + 1) * C - 1, i.e. chunk n and the
    `left_chunks` chunks before it. Frames before 0 (left of the first chunks) and after T - 1 (the
    rest of a partial last chunk) are zero-filled; masks must exclude them.
    """
    frames = x.shape[-2]
    chunks = -(-frames // chunk_frames)  # N
    left = left_chunks * chunk_frames
    x = F.pad(x, (0, 0, left, chunks * chunk_frames - frames))  # [..., left + N * C, E]
    window = left + chunk_frames  # W
    # unfold steps by C along the frames and appends the window as the last dim: [..., N, E, W].
    return x.unfold(-2, window, chunk_frames).transpose(-1, -2)  # [..., N, W, E]


class CausalConv1d(nn.Module):
    """Conv1d with kernel-1 zero frames of left padding: output t reads inputs s*t-k+1 .. s*t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames for `lengths` input frames: ceil(lengths / stride)."""
        stride = self.conv.stride[0]
        return (lengths + stride - 1) // stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, T] -> [B, C_out, ceil(T / stride)]."""
        return self.conv(F.pad(x, (self.conv.kernel_size[0] - 1, 0)))

    def init_buffer(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The streaming buffer before any input: the left padding, [B, C_in, kernel-1]."""
        pad = self.conv.kernel_size[0] - 1
        return torch.zeros(batch_size, self.in_channels, pad, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new input [B, C_in, t] to `buffer`; return (outputs now computable, new buffer).

        The buffer always starts at the first input frame of the next output, so an unpadded conv
        over it yields exactly the next outputs; their consumed frames (stride each) are dropped.
        """
        buffer = torch.cat([buffer, x], dim=-1)
        if buffer.shape[-1] < self.conv.kernel_size[0]:
            return buffer.new_zeros(buffer.shape[0], self.out_channels, 0), buffer
        y = self.conv(buffer)  # [B, C_out, n]
        return y, buffer[..., y.shape[-1] * self.conv.stride[0] :]


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding (rotate-half layout) at given positions."""

    inv_freq: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [Hd/2]
        # Not persistent: it is a function of the config, and checkpoints stay weights only.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (int) -> cos, sin [T, Hd], float32."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, Hd/2]
        angles = torch.cat([angles, angles], dim=-1)  # [T, Hd]
        return angles.cos(), angles.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, Hd] by the angles in cos/sin [T, Hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # [B, H, T, Hd]
    return (x * cos + rotated * sin).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary embedding; chunk windows (whole clip) or cached (streaming)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, frames, _ = x.shape
        qkv = self.qkv(x).view(batch, frames, 3, self.heads, self.head_dim)  # [B, T, 3, H, Hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, T, Hd]
        return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        batch, _, frames, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(batch, frames, -1))  # [B, H, T, Hd] -> [B, T, D]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Whole-clip block-causal attention, one chunk against its window at a time.

        Args:
            x: [B, T, D] frames.
            cos, sin: [T, Hd] rotary tables for x's positions.
            mask: [B, 1, N, C, W] True where a query of chunk n may attend to a frame of window n
                (see `_chunk_windows`); its shape gives C and W, hence `left_chunks`.

        Returns:
            [B, T, D].
        """
        batch, frames, _ = x.shape
        chunks, chunk_frames, window = mask.shape[-3:]  # N, C, W
        left_chunks = window // chunk_frames - 1
        q, k, v = self._project(x, cos, sin)  # each [B, H, T, Hd]
        # Queries chunk-wise, the partial last chunk padded with zero queries (dropped below).
        q = F.pad(q, (0, 0, 0, chunks * chunk_frames - frames))  # [B, H, N * C, Hd]
        q = q.unflatten(2, (chunks, chunk_frames))  # [B, H, N, C, Hd]
        k = _chunk_windows(k, chunk_frames, left_chunks)  # [B, H, N, W, Hd]
        v = _chunk_windows(v, chunk_frames, left_chunks)  # [B, H, N, W, Hd]
        # Chunks join the batch: sdpa's fused kernels take 4-d inputs only (this copies the
        # windows, (left_chunks + 1) times the size of k and v: still linear in T).
        q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (q, k, v))  # [B * N, H, C or W, Hd]
        mask = mask.transpose(1, 2).flatten(0, 1)  # [B * N, 1, C, W]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B * N, H, C, Hd]
        y = y.unflatten(0, (batch, chunks)).permute(0, 1, 3, 2, 4)  # [B, N, C, H, Hd]
        y = y.reshape(batch, chunks * chunk_frames, -1)[:, :frames]  # [B, T, D]
        return self.out(y)

    def step(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk x [B, C, D] against cached past keys/values [B, H, t, Hd].

        No mask: the cache holds only frames this chunk may see, and the chunk sees all of itself.
        Returns the output [B, C, D] and the keys and values [B, H, t + C, Hd] with this chunk appended.
        """
        q, k, v = self._project(x, cos, sin)
        k = torch.cat([cache[0], k], dim=2)
        v = torch.cat([cache[1], v], dim=2)
        return self._merge(F.scaled_dot_product_attention(q, k, v)), k, v

    def empty_cache(
        self, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of no frames yet, each [B, H, 0, Hd]."""
        empty = torch.zeros(batch_size, self.heads, 0, self.head_dim, device=device, dtype=dtype)
        return empty, empty.clone()


class MLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, *, norm_eps: float) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, heads)
        self.mlp_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], mask [B, 1, N, C, W] -> [B, T, D]; see `SelfAttention.forward`."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))

    def step(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One chunk [B, C, D] -> ([B, C, D], keys and values including this chunk)."""
        h, k, v = self.attn.step(self.attn_norm(x), cos, sin, cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), (k, v)


class StreamingEncoder(nn.Module):
    """Causal convs + block-causal transformer; the same weights encode whole clips or streams.

    Build it with `build_streaming_encoder(config)`.

    Args:
        convs: causal convolutions, applied in order with GELU after each; the first takes M mels,
            the last gives D channels.
        layers: transformer layers of width D.
        norm: final norm over D.
        rope: rotary tables shared by all layers.
        chunk_frames: attention chunk size in output frames (C).
        left_chunks: past chunks each chunk attends to, at every layer.
        config: the config the builder used; kept for saving, never read.
    """

    # Its linear layers, by name: where LoRA adapters go when the encoder is fine-tuned.
    lora_targets = ("qkv", "out", "up", "down")

    def __init__(
        self,
        convs: list[CausalConv1d],
        layers: list[EncoderLayer],
        norm: nn.Module,
        rope: RotaryEmbedding,
        *,
        chunk_frames: int,
        left_chunks: int,
        config: StreamingEncoderConfig | None = None,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rope = rope
        self.chunk_frames = chunk_frames
        self.left_chunks = left_chunks
        self.config = config

    # ModuleList types its items as plain Module; these give them their real types.
    def _conv_list(self) -> list[CausalConv1d]:
        return cast("list[CausalConv1d]", list(self.convs))

    def _layer_list(self) -> list[EncoderLayer]:
        return cast("list[EncoderLayer]", list(self.layers))

    @property
    def n_mels(self) -> int:
        """Mel bins expected at the input (M)."""
        return self._conv_list()[0].in_channels

    @property
    def dim(self) -> int:
        """Output width (D)."""
        return self._conv_list()[-1].out_channels

    @property
    def frame_rate(self) -> float:
        """Output frames per second for 100 input frames per second (25.0 with two stride-2 convs)."""
        stride = math.prod(conv.conv.stride[0] for conv in self._conv_list())
        return MEL_FRAME_RATE / stride

    def output_lengths(self, mel_frames: torch.Tensor) -> torch.Tensor:
        """Output frames for `mel_frames` input frames: ceil(ceil(T / 2) / 2) with the default convs."""
        for conv in self._conv_list():
            mel_frames = conv.output_lengths(mel_frames)
        return mel_frames

    # --- whole clips ----------------------------------------------------------------------

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of right-padded log-mel clips.

        Args:
            features: [B, M, T] log-mel frames at 100 frames/s.
            lengths: [B] int64 valid frames per clip; None means all T.

        Returns:
            Outputs [B, T', D] with T' = `output_lengths(T)` (zero past each clip's length) and
            their lengths [B]. Padding never influences valid outputs.
        """
        batch, _, frames = self._check_features(features, batch=None)
        lengths = self._check_lengths(lengths, batch, frames, features.device)
        out_lengths = self.output_lengths(lengths)
        if frames == 0:
            return features.new_zeros(batch, 0, self.dim), out_lengths
        x = features
        for conv in self.convs:
            x = F.gelu(conv(x))
        x = x.transpose(1, 2)  # [B, D, T'] -> [B, T', D]
        positions = torch.arange(x.shape[1], device=x.device)
        valid = positions[None, :] < out_lengths[:, None]  # [B, T']
        # Padding values may be anything (even non-finite); valid frames never read them through
        # the causal convs, and zeroing here keeps them out of masked attention sums (0 * nan).
        x = torch.where(valid[..., None], x, 0.0)
        mask = self._window_mask(valid)  # [B, 1, N, C, W]
        cos, sin = self.rope(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        x = torch.where(valid[..., None], self.norm(x), 0.0)
        return x, out_lengths

    def _window_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """Attention mask per chunk window, [B, 1, N, C, W] (True = attend), from valid [B, T'].

        The windows already make attention block-causal; the mask removes the frames a window
        holds but a query may not see. Valid queries see the valid frames of their window only.
        Padded queries (past a clip's length, or filling the partial last chunk) see every real
        frame 0..T'-1 of their window, so that no row is fully masked (some sdpa versions give nan
        there) and padded frames stay finite; valid frames never read them.
        """
        batch, frames = valid.shape
        chunks = -(-frames // self.chunk_frames)  # N

        def windows(flags: torch.Tensor) -> torch.Tensor:  # [..., T'] -> [..., N, W], False outside
            return _chunk_windows(flags[..., None], self.chunk_frames, self.left_chunks)[..., 0]

        real_keys = windows(torch.ones(frames, dtype=torch.bool, device=valid.device))  # [N, W]
        valid_keys = windows(valid)  # [B, N, W]
        valid_queries = F.pad(valid, (0, chunks * self.chunk_frames - frames))  # [B, N * C]
        valid_queries = valid_queries.view(batch, chunks, self.chunk_frames)  # [B, N, C]
        mask = valid_keys[:, :, None, :] | (~valid_queries[..., None] & real_keys[:, None, :])  # [B, N, C, W]
        return mask[:, None]  # [B, 1, N, C, W]

    def _check_features(self, features: torch.Tensor, batch: int | None) -> tuple[int, int, int]:
        if features.dim() != 3 or features.shape[1] != self.n_mels:
            raise ValueError(f"features must be [B, {self.n_mels}, T], got {list(features.shape)}")
        if batch is not None and features.shape[0] != batch:
            raise ValueError(f"features have batch {features.shape[0]}, the stream state has {batch}")
        return features.shape[0], features.shape[1], features.shape[2]

    @staticmethod
    def _check_lengths(lengths: torch.Tensor | None, batch: int, frames: int, device: torch.device) -> torch.Tensor:
        if lengths is None:
            return torch.full((batch,), frames, dtype=torch.int64, device=device)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must be [{batch}], got {list(lengths.shape)}")
        if bool((lengths < 0).any()) or bool((lengths > frames).any()):
            raise ValueError(f"lengths must lie in 0..{frames}, got {lengths.tolist()}")
        return lengths.to(device=device, dtype=torch.int64)

    # --- streaming ------------------------------------------------------------------------

    def init_state(self, batch_size: int = 1) -> EncoderStreamState:
        """A fresh stream state for `batch_size` clips advancing together (weights' device and dtype)."""
        convs = self._conv_list()
        weight = convs[0].conv.weight
        device, dtype = weight.device, weight.dtype
        return EncoderStreamState(
            conv_buffers=[conv.init_buffer(batch_size, device, dtype) for conv in convs],
            kv_caches=[layer.attn.empty_cache(batch_size, device, dtype) for layer in self._layer_list()],
            pending=torch.zeros(batch_size, 0, self.dim, device=device, dtype=dtype),
        )

    def stream(self, features: torch.Tensor, state: EncoderStreamState) -> torch.Tensor:
        """Consume the next mel frames and return the outputs that are now final.

        `state` is updated in place. Only complete attention chunks are final (every frame sees
        its whole chunk), so this returns a multiple of `chunk_frames` frames, possibly zero.
        Concatenating every `stream` output and then `flush` gives `forward` on the whole clip.

        Args:
            features: [B, M, t] the next t >= 0 log-mel frames of each clip.
            state: from `init_state(B)`, not yet flushed.

        Returns:
            [B, n, D] the next n final output frames.
        """
        self._check_open(state)
        self._check_features(features, batch=state.batch_size)
        x = features
        for i, conv in enumerate(self._conv_list()):
            y, state.conv_buffers[i] = conv.step(x, state.conv_buffers[i])
            x = F.gelu(y)
        pending = torch.cat([state.pending, x.transpose(1, 2)], dim=1)  # [B, t, D]
        complete = pending.shape[1] // self.chunk_frames * self.chunk_frames
        outputs = [
            self._encode_chunk(pending[:, start : start + self.chunk_frames], state)
            for start in range(0, complete, self.chunk_frames)
        ]
        state.pending = pending[:, complete:]
        return torch.cat(outputs, dim=1) if outputs else pending.new_zeros(pending.shape[0], 0, self.dim)

    def flush(self, state: EncoderStreamState) -> torch.Tensor:
        """End the clip: encode and return the last, partial chunk [B, n < chunk_frames, D].

        The convs hold nothing more to emit: like `forward`, they produce an output only once its
        last input frame has arrived. The state is finished afterwards; start a new one per clip.
        """
        self._check_open(state)
        pending, state.pending = state.pending, state.pending[:, :0]
        state.finished = True
        if pending.shape[1] == 0:
            return pending
        return self._encode_chunk(pending, state)

    def _encode_chunk(self, x: torch.Tensor, state: EncoderStreamState) -> torch.Tensor:
        """Run one chunk [B, C, D] (the last may be shorter) through the layers; advance the caches."""
        frames = x.shape[1]
        positions = torch.arange(state.position, state.position + frames, device=x.device)
        cos, sin = self.rope(positions)
        keep = self.left_chunks * self.chunk_frames
        for i, layer in enumerate(self._layer_list()):
            x, (k, v) = layer.step(x, cos, sin, state.kv_caches[i])
            # Slice by start index: a [-0:] slice would keep everything when left_chunks is 0.
            start = max(0, k.shape[2] - keep)
            state.kv_caches[i] = (k[:, :, start:], v[:, :, start:])  # [B, H, <= keep, Hd]
        state.position += frames
        return self.norm(x)

    @staticmethod
    def _check_open(state: EncoderStreamState) -> None:
        if state.finished:
            raise RuntimeError("this stream state was flushed; call init_state() for the next clip")


def build_streaming_encoder(config: StreamingEncoderConfig) -> StreamingEncoder:
    """Build a randomly initialised `StreamingEncoder` from its config.

    Args:
        config: hyper-parameters; stored on the module as `.config` for saving.

    Returns:
        The encoder, mapping [B, n_mels, T] at 100 frames/s to [B, ceil(T / 4), dim] at 25 frames/s.
    """
    convs = [
        CausalConv1d(config.n_mels, config.dim, config.conv_kernel, _CONV_STRIDE),
        CausalConv1d(config.dim, config.dim, config.conv_kernel, _CONV_STRIDE),
    ]
    hidden = int(round(config.dim * config.mlp_ratio))
    layers = [EncoderLayer(config.dim, config.heads, hidden, norm_eps=config.norm_eps) for _ in range(config.layers)]
    return StreamingEncoder(
        convs,
        layers,
        nn.RMSNorm(config.dim, eps=config.norm_eps),
        RotaryEmbedding(config.dim // config.heads, config.rope_theta),
        chunk_frames=config.chunk_frames,
        left_chunks=config.left_chunks,
        config=config,
    )
