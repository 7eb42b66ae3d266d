"""Streaming encoder: streaming == whole clip, block-causal receptive field, lengths, padding, config."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from voxtune.model.streaming_encoder import (
    StreamingEncoder,
    StreamingEncoderConfig,
    build_streaming_encoder,
)

TOL = 1e-5
N_MELS = 16


def make_encoder(seed: int = 0, **overrides) -> StreamingEncoder:
    """A tiny encoder (dim 32, 2 layers, 2 heads) with seeded random weights."""
    fields = dict(n_mels=N_MELS, dim=32, layers=2, heads=2, mlp_ratio=2.0, chunk_frames=3, left_chunks=2)
    fields.update(overrides)
    torch.manual_seed(seed)
    return build_streaming_encoder(StreamingEncoderConfig(**fields)).eval()


def make_features(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, N_MELS, frames, generator=generator)


def random_pieces(total: int, seed: int, largest: int = 12) -> list[int]:
    """Piece sizes 0..largest (zeros included) that add up to `total`."""
    rng = random.Random(seed)
    pieces = []
    while sum(pieces) < total:
        pieces.append(min(rng.randint(0, largest), total - sum(pieces)))
    return pieces


def run_stream(encoder: StreamingEncoder, features: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Feed `features` [B, M, T] in pieces of the given sizes, then flush; outputs [B, T', D]."""
    assert sum(pieces) == features.shape[-1]
    state = encoder.init_state(features.shape[0])
    outputs, start = [], 0
    keep = encoder.left_chunks * encoder.chunk_frames
    for size in pieces:
        out = encoder.stream(features[..., start : start + size], state)
        assert out.shape[1] % encoder.chunk_frames == 0, "stream returns whole chunks only"
        assert all(k.shape[2] <= keep and v.shape[2] <= keep for k, v in state.kv_caches)
        outputs.append(out)
        start += size
    outputs.append(encoder.flush(state))
    return torch.cat(outputs, dim=1)


FRAMES = 97  # not a multiple of 4, so the last conv output and the last chunk are partial

CHUNKINGS = [
    pytest.param([FRAMES], id="whole-clip"),
    pytest.param([1] * FRAMES, id="single-frames"),
    pytest.param([0, 1] * FRAMES, id="empty-and-single"),
    pytest.param([0, 2, 0, 70, 0, 25, 0], id="one-piece-many-chunks"),
    pytest.param([3, 0, 1, 17, 2, 0, 5, 40, 1, 28], id="mixed"),
    *(pytest.param(random_pieces(FRAMES, seed), id=f"random-seed{seed}") for seed in range(3)),
]

CONFIGS = [
    pytest.param(dict(chunk_frames=2, left_chunks=1), id="chunk2-left1"),
    pytest.param(dict(chunk_frames=4, left_chunks=2), id="chunk4-left2"),
    pytest.param(dict(chunk_frames=3, left_chunks=0, conv_kernel=5, layers=1), id="chunk3-left0-kernel5"),
]


@torch.no_grad()
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("pieces", CHUNKINGS)
def test_streaming_equals_whole_clip(config, pieces):
    encoder = make_encoder(**config)
    features = make_features(1, FRAMES)
    full, _ = encoder(features)
    streamed = run_stream(encoder, features, pieces)
    assert streamed.shape == full.shape
    assert (streamed - full).abs().max().item() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("pieces", CHUNKINGS[:1] + CHUNKINGS[3:6])
def test_streaming_equals_whole_clip_batch_of_two(pieces):
    encoder = make_encoder(chunk_frames=4, left_chunks=2)
    features = make_features(2, FRAMES)
    full, _ = encoder(features)
    streamed = run_stream(encoder, features, pieces)
    assert streamed.shape == full.shape == (2, 25, 32)
    assert (streamed - full).abs().max().item() <= TOL


@torch.no_grad()
def test_stream_state_misuse_is_an_error():
    encoder = make_encoder()
    state = encoder.init_state(2)
    with pytest.raises(ValueError, match="batch"):
        encoder.stream(make_features(1, 8), state)
    with pytest.raises(ValueError, match="features must be"):
        encoder.stream(torch.zeros(2, N_MELS + 1, 8), state)
    encoder.stream(make_features(2, 8), state)
    encoder.flush(state)
    with pytest.raises(RuntimeError, match="init_state"):
        encoder.stream(make_features(2, 8), state)


# --- block-causal receptive field -----------------------------------------------------------
# Output frame j reads mel frames 4j - 3(k-1) .. 4j through the two stride-2 convs of kernel k.
# At each layer a chunk sees `left_chunks` chunks back, so the stack reaches layers * left_chunks.

KERNEL = 3


def first_mel(frame: int) -> int:
    return 4 * frame - 3 * (KERNEL - 1)


def last_mel(frame: int) -> int:
    return 4 * frame


def perturbed(features: torch.Tensor, frames: slice | int) -> torch.Tensor:
    out = features.clone()
    out[..., frames] += 3.0 * torch.randn_like(out[..., frames])
    return out


RECEPTIVE_FIELDS = [
    pytest.param(dict(layers=1, chunk_frames=2, left_chunks=1), 5, id="1layer-chunk2-left1"),
    pytest.param(dict(layers=2, chunk_frames=2, left_chunks=1), 5, id="2layers-chunk2-left1"),
    pytest.param(dict(layers=2, chunk_frames=3, left_chunks=2), 6, id="2layers-chunk3-left2"),
]


@torch.no_grad()
@pytest.mark.parametrize("config,chunk", RECEPTIVE_FIELDS)
def test_future_frames_do_not_change_earlier_outputs(config, chunk):
    encoder = make_encoder(conv_kernel=KERNEL, **config)
    features = make_features(1, 160)
    base, _ = encoder(features)
    end = (chunk + 1) * config["chunk_frames"]  # first output frame after the chunk
    future, _ = encoder(perturbed(features, slice(last_mel(end - 1) + 1, None)))
    assert torch.allclose(future[:, :end], base[:, :end], atol=1e-6, rtol=0)
    # The chunk's last frame reads mel frame last_mel(end - 1), so the bound above is tight.
    edge, _ = encoder(perturbed(features, last_mel(end - 1)))
    assert (edge[:, end - 1] - base[:, end - 1]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("config,chunk", RECEPTIVE_FIELDS)
def test_past_beyond_the_window_does_not_change_a_chunk(config, chunk):
    encoder = make_encoder(conv_kernel=KERNEL, **config)
    features = make_features(1, 160)
    base, _ = encoder(features)
    size = config["chunk_frames"]
    frames = slice(chunk * size, (chunk + 1) * size)
    earliest = (chunk - config["layers"] * config["left_chunks"]) * size  # first output frame it can see
    assert first_mel(earliest) > 0

    before, _ = encoder(perturbed(features, slice(0, first_mel(earliest))))
    assert torch.allclose(before[:, frames], base[:, frames], atol=1e-6, rtol=0)
    # The mel frame at the edge of the window, and one just before the chunk, do reach it.
    edge, _ = encoder(perturbed(features, first_mel(earliest)))
    assert (edge[:, frames] - base[:, frames]).abs().max() > 1e-4
    inside, _ = encoder(perturbed(features, first_mel(chunk * size) - 1))
    assert (inside[:, frames] - base[:, frames]).abs().max() > 1e-3


# --- lengths, padding, rate -----------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(
    "frames,expected", [(0, 0), (1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (401, 101)]
)
def test_output_lengths(frames, expected):
    encoder = make_encoder()
    assert encoder.output_lengths(torch.tensor([frames])).tolist() == [expected]
    out, lengths = encoder(make_features(1, frames))
    assert out.shape == (1, expected, encoder.dim)
    assert lengths.tolist() == [expected]


@torch.no_grad()
def test_padded_batch_equals_each_clip_alone():
    encoder = make_encoder(chunk_frames=2, left_chunks=1)
    clip_lengths = [50, 37, 13, 1]
    features = 1e3 * make_features(len(clip_lengths), max(clip_lengths), seed=5)  # loud padding
    clips = [make_features(1, n, seed=10 + i) for i, n in enumerate(clip_lengths)]
    for i, clip in enumerate(clips):
        features[i, :, : clip.shape[-1]] = clip[0]

    out, lengths = encoder(features, torch.tensor(clip_lengths))
    assert lengths.tolist() == encoder.output_lengths(torch.tensor(clip_lengths)).tolist()
    for i, clip in enumerate(clips):
        alone, _ = encoder(clip)
        valid = alone.shape[1]
        assert valid == lengths[i]
        assert (out[i, :valid] - alone[0]).abs().max().item() <= TOL
        assert not out[i, valid:].any(), "padded outputs are zeroed"


# --- whole clips: chunk-windowed attention == full block-causal mask ------------------------


def reference_forward(
    encoder: StreamingEncoder, features: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The whole-clip semantics spelled out with a full [T', T'] mask: quadratic, short clips only.

    Query frame i sees key frame j when j's chunk is i's own or one of the `left_chunks` before
    it; valid queries see valid keys only, padded queries their whole block window.
    """
    batch, _, frames = features.shape
    lengths = torch.full((batch,), frames) if lengths is None else lengths
    x = features
    for conv in encoder.convs:
        x = F.gelu(conv(x))
    x = x.transpose(1, 2)  # [B, T', D]
    positions = torch.arange(x.shape[1])
    valid = positions[None, :] < encoder.output_lengths(lengths)[:, None]  # [B, T']
    x = torch.where(valid[..., None], x, 0.0)
    chunk = positions // encoder.chunk_frames
    distance = chunk[:, None] - chunk[None, :]  # [T', T'] query chunk - key chunk
    block = (distance >= 0) & (distance <= encoder.left_chunks)
    mask = (block & (valid[:, None, :] | ~valid[:, :, None]))[:, None]  # [B, 1, T', T']
    cos, sin = encoder.rope(positions)
    for layer in encoder.layers:
        q, k, v = layer.attn._project(layer.attn_norm(x), cos, sin)
        x = x + layer.attn._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        x = x + layer.mlp(layer.mlp_norm(x))
    return torch.where(valid[..., None], encoder.norm(x), 0.0)


REFERENCE_CONFIGS = [
    *CONFIGS,
    pytest.param(dict(chunk_frames=1, left_chunks=3), id="chunk1-left3"),
    pytest.param(dict(chunk_frames=5, left_chunks=30), id="window-longer-than-clip"),
]


@torch.no_grad()
@pytest.mark.parametrize("config", REFERENCE_CONFIGS)
@pytest.mark.parametrize("frames", [97, 96, 4, 1])  # T' 25 or 24 (partial / whole last chunks), 1
def test_forward_equals_full_mask_reference(config, frames):
    encoder = make_encoder(**config)
    clip_lengths = torch.tensor([frames, frames * 2 // 3, 1, 0])
    features = 1e3 * make_features(4, frames, seed=7)  # loud padding
    for i, n in enumerate(clip_lengths.tolist()):
        features[i, :, :n] = make_features(1, n, seed=20 + i)[0]
    out, _ = encoder(features, clip_lengths)
    expected = reference_forward(encoder, features, clip_lengths)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= TOL


def test_gradients_equal_full_mask_reference():
    encoder = make_encoder(chunk_frames=4, left_chunks=2)
    clip_lengths = torch.tensor([97, 50])
    features = make_features(2, 97)
    weights = torch.randn(2, 25, encoder.dim, generator=torch.Generator().manual_seed(3))
    grads = []
    for run in (encoder, lambda f, n: (reference_forward(encoder, f, n), n)):
        encoder.zero_grad()
        out, _ = run(features, clip_lengths)
        (out * weights).sum().backward()
        grads.append({name: p.grad.clone() for name, p in encoder.named_parameters()})
    for name, grad in grads[0].items():
        assert (grad - grads[1][name]).abs().max().item() <= 1e-4, name


class LargestTensor(TorchFunctionMode):
    """Records the most elements of any tensor a torch function returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return result


@torch.no_grad()
def test_long_clip_is_linear_in_memory_and_equals_streaming():
    # 20 minutes: 30000 output frames. A [T', T'] mask alone would have 9e8 elements (and the
    # old chunk distance matrix was int64, 7 GB); windowed attention needs ~100 T' at most here.
    encoder = make_encoder(chunk_frames=8, left_chunks=2)
    features = make_features(1, 20 * 60 * 100, seed=4)
    with LargestTensor() as largest:
        out, lengths = encoder(features)
    frames = lengths.item()
    assert out.shape == (1, frames, encoder.dim) and frames == 30000
    assert largest.numel * 100 < frames * frames, f"a tensor of {largest.numel} elements for T' = {frames}"
    streamed = run_stream(encoder, features, [features.shape[-1]])
    assert (streamed - out).abs().max().item() <= TOL


def test_bad_lengths_are_rejected():
    encoder = make_encoder()
    with pytest.raises(ValueError, match="lengths"):
        encoder(make_features(2, 10), torch.tensor([10, 11]))
    with pytest.raises(ValueError, match="lengths"):
        encoder(make_features(2, 10), torch.tensor([10]))


@torch.no_grad()
def test_frame_rate_is_25_per_second():
    encoder = make_encoder()
    out, _ = encoder(make_features(1, 100))  # one second of mel frames
    assert out.shape == (1, 25, 32)
    assert encoder.frame_rate == 25.0
    assert encoder.dim == 32


# --- config ---------------------------------------------------------------------------------


def test_config_round_trip():
    config = StreamingEncoderConfig(n_mels=128, dim=64, layers=3, heads=2, chunk_frames=2, left_chunks=5)
    assert StreamingEncoderConfig.from_dict(config.to_dict()) == config
    assert StreamingEncoderConfig.from_dict({}) == StreamingEncoderConfig()
    assert make_encoder(dim=48).config.dim == 48


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="chunk_size.*nope"):
        StreamingEncoderConfig.from_dict({"dim": 64, "nope": 1, "chunk_size": 4})
    with pytest.raises(ValueError, match="heads"):
        StreamingEncoderConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="chunk_frames"):
        StreamingEncoderConfig(chunk_frames=0)
