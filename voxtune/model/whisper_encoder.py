"""Whisper's audio encoder, for any clip length (30 s windows), with pretrained Whisper weights.

Architecture, as OpenAI's Whisper and transformers' `WhisperEncoder`:

- conv1 (kernel 3, padding 1) + GELU, conv2 (kernel 3, stride 2, padding 1) + GELU: 100 mel
  frames/s in, 50 encoder frames/s out;
- plus a frozen sinusoidal position table, sliced to the clip's length (transformers insists on
  exactly 30 s, 3000 mel frames, which wastes compute on short clips and makes callers pad);
- pre-LayerNorm transformer layers: self-attention with biases on q, v and out but not k, q
  scaled by Hd**-0.5 before the dot product; fc1 -> activation -> fc2; a final LayerNorm;
- right-padded batches carry `lengths`: padded frames are zeroed before each conv and masked out
  of attention, so each clip's output is the same as when it is encoded alone;
- `encode_windows` reads a clip longer than the position table in consecutive 30 s windows, each
  encoded alone, their outputs joined (as Ultravox and vLLM read long audio).

Parameter names are those of transformers' `WhisperEncoder`, so its state dict loads strictly.
Dropout and LayerDrop are left out: every released Whisper checkpoint sets them to 0.

Shape letters in comments: B batch, M mels, T mel frames, T' encoder frames, D model dim,
H heads, Hd head dim.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import WhisperConfig

__all__ = ["WhisperEncoder", "build_whisper_encoder", "load_whisper_encoder"]

# Whisper's log-mel features: 16 kHz audio, hop 160 samples (voxtune.audio.features).
MEL_FRAME_RATE = 100.0

# transformers' `activation_function` names that have a torch equivalent. Whisper uses "gelu".
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# Where the encoder sits in a checkpoint: WhisperForConditionalGeneration, then WhisperModel (or
# WhisperForAudioClassification); with neither, the checkpoint is a bare encoder.
_ENCODER_PREFIXES = ("model.encoder.", "encoder.")
_SAFETENSORS_INDEX = "model.safetensors.index.json"

StateDict = Mapping[str, Tensor]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's sinusoidal position table, `[length, channels]`: sines then cosines."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even number of channels, got {channels}")
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]  # [length, channels/2]
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class WhisperSelfAttention(nn.Module):
    """Whisper's multi-head self-attention.

    Args:
        dim (int): model dim D.
        num_heads (int): heads H; D must divide by H.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} does not divide into {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        # No bias on k: it would add the same score to every key of a query, which softmax cancels.
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Attend over the frames of `x` `[B, T', D]`.

        `key_mask` is boolean `[B, 1, 1, T']`, True for frames that may be attended to, or None
        for all frames. Returns `[B, T', D]`.
        """
        b, t, d = x.shape
        # Whisper scales q before the dot product rather than the scores after it; keeping its
        # order keeps the float rounding of pretrained checkpoints' own implementation.
        heads = (b, t, self.num_heads, self.head_dim)
        q = (self.q_proj(x) * self.scaling).view(heads).transpose(1, 2)  # [B, H, T', Hd]
        k = self.k_proj(x).view(heads).transpose(1, 2)  # [B, H, T', Hd]
        v = self.v_proj(x).view(heads).transpose(1, 2)  # [B, H, T', Hd]
        # scale=1.0: q is already scaled.
        out = F.scaled_dot_product_attention(q, k, v, key_mask, scale=1.0)  # [B, H, T', Hd]
        out = out.transpose(1, 2).reshape(b, t, d)  # [B, T', D]
        return self.out_proj(out)


class WhisperEncoderLayer(nn.Module):
    """A pre-LayerNorm transformer layer: self-attention, then a two-layer MLP, each residual.

    Args:
        dim (int): model dim D.
        num_heads (int): attention heads H.
        ffn_dim (int): hidden width of the MLP.
        activation (Callable[[Tensor], Tensor]): the MLP's activation.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, activation: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.self_attn = WhisperSelfAttention(dim, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = activation

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """`x` `[B, T', D]` -> `[B, T', D]`; `key_mask` as in `WhisperSelfAttention`."""
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder: log-mel frames in, 50 encoder frames per second out.

    Build it with `build_whisper_encoder(config)` or load pretrained weights with
    `load_whisper_encoder(path)`.

    Args:
        num_mels (int): mel bins M of the input features (80, or 128 for large-v3).
        dim (int): model dim D.
        num_layers (int): transformer layers.
        num_heads (int): attention heads H.
        ffn_dim (int): hidden width of each layer's MLP.
        max_positions (int): rows of the position table, the longest output T' (1500 = 30 s).
        activation (Callable[[Tensor], Tensor]): the MLP activation; Whisper's is exact GELU.
    """

    # Its linear layers, by name: where LoRA adapters go when the encoder is fine-tuned.
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    def __init__(
        self,
        *,
        num_mels: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        max_positions: int,
        activation: Callable[[Tensor], Tensor] = F.gelu,
    ) -> None:
        super().__init__()
        self.num_mels = num_mels
        self.conv1 = nn.Conv1d(num_mels, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        # An Embedding (not a buffer) so that the key and its frozen state match transformers'.
        self.embed_positions = nn.Embedding(max_positions, dim)
        with torch.no_grad():
            self.embed_positions.weight.copy_(sinusoids(max_positions, dim))
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList(WhisperEncoderLayer(dim, num_heads, ffn_dim, activation) for _ in range(num_layers))
        self.layer_norm = nn.LayerNorm(dim)

    @property
    def dim(self) -> int:
        """Model dim D of the output frames."""
        return self.layer_norm.normalized_shape[0]

    @property
    def frame_rate(self) -> float:
        """Output frames per second: conv2's stride 2 halves the 100 mel frames per second."""
        return MEL_FRAME_RATE / self.conv2.stride[0]

    @property
    def max_frames(self) -> int:
        """The longest input in mel frames, T = 2 * max_positions (3000 = 30 s for Whisper)."""
        return self.embed_positions.num_embeddings * self.conv2.stride[0]

    def output_lengths(self, mel_frames: Tensor) -> Tensor:
        """Encoder frames T' for `mel_frames` T: (T - 1) // 2 + 1, conv2's output length."""
        return (mel_frames - 1) // 2 + 1

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode log-mel features.

        Args:
            features (Tensor): `[B, M, T]` log-mel frames, 1 <= T <= `max_frames`, right-padded
                when the clips differ in length. The values beyond a clip's length do not matter.
            lengths (Tensor | None): `[B]` int64 valid mel frames per clip, or None when every
                clip fills all T frames.

        Returns:
            tuple[Tensor, Tensor]: `[B, T', D]` encoder frames with T' = (T - 1) // 2 + 1, zero
            beyond each clip's output length, and `[B]` int64 output lengths.

        Raises:
            ValueError: on a shape other than `[B, M, T]`, T outside [1, max_frames], or lengths
                that are not `[B]` integers in [1, T].
        """
        if features.ndim != 3 or features.shape[1] != self.num_mels:
            shape = tuple(features.shape)
            raise ValueError(f"features must be [B, {self.num_mels}, T], got {shape}")
        b, _, t = features.shape
        if not 1 <= t <= self.max_frames:
            raise ValueError(
                f"Whisper's encoder takes 1 to {self.max_frames} mel frames "
                f"({self.max_frames / MEL_FRAME_RATE:g} s), got {t}; split longer audio"
            )
        if lengths is None:
            frame_mask = out_mask = key_mask = None
        else:
            _check_lengths(lengths, b, t)
            frame_mask = torch.arange(t, device=features.device) < lengths[:, None]  # [B, T]

        x = self._embed(features, frame_mask)  # [B, T', D]
        t_out = x.shape[1]
        x = x + self.embed_positions.weight[:t_out]  # 1 <= T' <= max_positions, checked above
        if lengths is None:
            out_lengths = torch.full((b,), t_out, dtype=torch.int64, device=features.device)
        else:
            out_lengths = self.output_lengths(lengths)
            out_mask = torch.arange(t_out, device=features.device) < out_lengths[:, None]  # [B, T']
            key_mask = out_mask[:, None, None, :]  # [B, 1, 1, T']: same keys for all heads, queries
        for layer in self.layers:
            x = layer(x, key_mask)
        x = self.layer_norm(x)
        if out_mask is not None:
            x = x * out_mask[..., None]  # zeros: nothing downstream can mistake padding for audio
        return x, out_lengths

    def encode_windows(self, features: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode clips of any length: each cut into consecutive windows of `max_frames` mel
        frames (the last one shorter), every window encoded alone, its outputs joined in order.

        Args and returns as `forward`, without its upper bound on T: a clip of at most
        `max_frames` frames is encoded exactly as `forward` encodes it.
        """
        b, mels, t = features.shape
        if t <= self.max_frames:
            return self(features, lengths)
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.int64, device=features.device)
        _check_lengths(lengths, b, t)
        w = self.max_frames
        k = -(-t // w)  # windows of the longest clip
        padded = F.pad(features, (0, k * w - t))  # [B, M, K * W]
        windows = padded.reshape(b, mels, k, w).transpose(1, 2).reshape(b * k, mels, w)  # [B * K, M, W]
        window_frames = (lengths[:, None] - torch.arange(k, device=lengths.device) * w).clamp(0, w)  # [B, K]
        used = window_frames.reshape(-1) > 0  # a shorter clip has fewer windows
        hidden, out_lengths = self(windows[used], window_frames.reshape(-1)[used])  # [U, W', D], [U]
        valid = torch.arange(hidden.shape[1], device=hidden.device) < out_lengths[:, None]  # [U, W']
        joined = hidden[valid]  # [sum T', D]: window by window, so clip by clip
        clip_of = torch.arange(b, device=lengths.device).repeat_interleave(k)[used]  # [U]
        clip_lengths = torch.zeros(b, dtype=torch.int64, device=lengths.device).index_add_(0, clip_of, out_lengths)
        out = nn.utils.rnn.pad_sequence(list(joined.split(clip_lengths.tolist())), batch_first=True)  # [B, T', D]
        return out, clip_lengths

    def window_output_lengths(self, mel_frames: int) -> int:
        """Encoder frames `encode_windows` gives for a clip of `mel_frames` frames."""
        full, rest = divmod(mel_frames, self.max_frames)
        last = int(self.output_lengths(torch.tensor(rest))) if rest else 0
        return full * int(self.output_lengths(torch.tensor(self.max_frames))) + last

    def _embed(self, features: Tensor, frame_mask: Tensor | None) -> Tensor:
        """The conv stem: `[B, M, T]` -> `[B, T', D]`.

        Each conv sees one frame either side, so the last valid frames of a padded clip would
        see its padding. Zeroing the padding before each conv makes them see zeros, exactly as
        an unpadded clip sees the convs' own zero padding.
        """
        x = features if frame_mask is None else features * frame_mask[:, None, :]
        x = F.gelu(self.conv1(x))  # [B, D, T]
        if frame_mask is not None:
            x = x * frame_mask[:, None, :]  # GELU(bias) is not zero, so mask after it
        x = F.gelu(self.conv2(x))  # [B, D, T']
        return x.transpose(1, 2)  # [B, T', D]


def _check_lengths(lengths: Tensor, batch: int, frames: int) -> None:
    """Raise a ValueError unless `lengths` is `[batch]` integers in [1, frames]."""
    if lengths.shape != (batch,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        got = f"{lengths.dtype} {tuple(lengths.shape)}"
        raise ValueError(f"lengths must be [{batch}] integers, got {got}")
    # A clip of 0 frames would leave attention nothing to attend to (NaN rows).
    if int(lengths.min()) < 1 or int(lengths.max()) > frames:
        raise ValueError(f"lengths must be in [1, {frames}] (the padded T), got {lengths.tolist()}")


def build_whisper_encoder(config: WhisperConfig) -> WhisperEncoder:
    """Build a randomly initialised Whisper encoder from a transformers `WhisperConfig`.

    Reads num_mel_bins, d_model, encoder_layers, encoder_attention_heads, encoder_ffn_dim,
    activation_function and max_source_positions. `scale_embedding` is not read: it scales the
    decoder's token embeddings only (transformers' encoder computes `embed_scale` and never uses
    it). Dropout settings are not read either (see the module docstring).

    Args:
        config (WhisperConfig): the config of any Whisper checkpoint.

    Returns:
        WhisperEncoder: in float32, with sinusoidal positions and PyTorch's default init.

    Raises:
        ValueError: if the activation function has no torch equivalent here.
    """
    name = config.activation_function
    if name not in _ACTIVATIONS:
        supported = ", ".join(sorted(_ACTIVATIONS))
        raise ValueError(f"unsupported activation_function {name!r}; supported: {supported}")
    return WhisperEncoder(
        num_mels=config.num_mel_bins,
        dim=config.d_model,
        num_layers=config.encoder_layers,
        num_heads=config.encoder_attention_heads,
        ffn_dim=config.encoder_ffn_dim,
        max_positions=config.max_source_positions,
        activation=_ACTIVATIONS[name],
    )


def load_whisper_encoder(
    path_or_state_dict: str | os.PathLike | StateDict, config: WhisperConfig | None = None
) -> WhisperEncoder:
    """Build a Whisper encoder and load pretrained weights into it, strictly.

    Accepts the checkpoint of a `WhisperForConditionalGeneration` (keys `model.encoder.*`), a
    `WhisperModel` (`encoder.*`) or a bare encoder (no prefix); other keys (the decoder) are
    skipped, and never read from safetensors files.

    Args:
        path_or_state_dict (str | os.PathLike | Mapping[str, Tensor]): a checkpoint directory
            with config.json and model.safetensors (or a sharded model.safetensors.index.json,
            or pytorch_model.bin); a single .safetensors or .bin file; or a state dict.
        config (WhisperConfig | None): the architecture; read from the directory's config.json
            when None. Required for a file or a state dict.

    Returns:
        WhisperEncoder: the encoder with the checkpoint's weights, in float32.

    Raises:
        FileNotFoundError: if the path or the weights in a directory do not exist.
        ValueError: if no config is given or found, or the encoder keys in the checkpoint do not
            match the config's encoder: the message names the missing, unexpected and
            mis-shaped keys.
    """
    if isinstance(path_or_state_dict, Mapping):
        if config is None:
            raise ValueError("load_whisper_encoder needs config= to load a state dict")
        prefix = _encoder_prefix(path_or_state_dict)
        state_dict = {k: v for k, v in path_or_state_dict.items() if k.startswith(prefix)}
        source = "the state dict"
    else:
        path = Path(path_or_state_dict)
        if config is None:
            config = _read_config(path)
        state_dict, prefix = _read_encoder_weights(path)
        source = str(path)

    encoder = build_whisper_encoder(config)
    state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    _check_keys(state_dict, encoder.state_dict(), source, prefix)
    encoder.load_state_dict(state_dict, strict=True)
    return encoder


def _read_config(path: Path) -> WhisperConfig:
    """The WhisperConfig in the checkpoint directory `path`."""
    if not path.is_dir():
        raise ValueError(f"load_whisper_encoder needs config= to load the file {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}; pass config=")
    # Imported here: transformers is heavy, and only needed to read a checkpoint's config.
    from transformers import WhisperConfig

    return WhisperConfig.from_pretrained(path)


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint file or directory, safetensors first."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no Whisper checkpoint at {path}")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    if (path / _SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / _SAFETENSORS_INDEX).read_text())["weight_map"]
        prefix = _encoder_prefix(weight_map)
        names = {file for key, file in weight_map.items() if key.startswith(prefix)}
        return [path / name for name in sorted(names)]
    raise FileNotFoundError(f"no model.safetensors, {_SAFETENSORS_INDEX} or pytorch_model.bin in {path}")


def _read_encoder_weights(path: Path) -> tuple[dict[str, Tensor], str]:
    """The encoder tensors in a checkpoint file or directory, with their key prefix."""
    files = _weight_files(path)
    if files[0].suffix == ".safetensors":
        from safetensors import safe_open

        handles = [safe_open(f, framework="pt", device="cpu") for f in files]
        prefix = _encoder_prefix(k for h in handles for k in h.keys())
        # safe_open reads tensors one by one: the decoder's half of the file is never loaded.
        tensors = {k: h.get_tensor(k) for h in handles for k in h.keys() if k.startswith(prefix)}
        return tensors, prefix
    state_dict = torch.load(files[0], map_location="cpu", weights_only=True)
    prefix = _encoder_prefix(state_dict)
    return {k: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix


def _encoder_prefix(keys: Iterable[str]) -> str:
    """The prefix of the encoder's keys: the first of `_ENCODER_PREFIXES` present, else ''."""
    keys = list(keys)
    for prefix in _ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _check_keys(state_dict: StateDict, expected: StateDict, source: str, prefix: str) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped key."""
    problems = []
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs encoder {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if mismatched:
        problems.append(f"mis-shaped keys: {_some(mismatched)}")
    if problems:
        where = f" (after the prefix {prefix!r})" if prefix else ""
        raise ValueError(f"Whisper encoder weights in {source} do not match the config{where}: " + "; ".join(problems))


def _some(names: list[str], limit: int = 10) -> str:
    """Up to `limit` names, comma-separated, and how many more there are."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
