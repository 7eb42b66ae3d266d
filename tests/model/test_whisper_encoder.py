"""voxtune's Whisper encoder: parity with transformers, any length, padded batches, loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from voxtune.model.whisper_encoder import (
    WhisperEncoder,
    build_whisper_encoder,
    load_whisper_encoder,
)

PARITY_TOL = 1e-4  # ours vs transformers: the same maths in a different kernel order
BATCH_TOL = 1e-5  # padded batch vs one clip at a time


def tiny_config(num_mels: int = 80, **overrides) -> WhisperConfig:
    """A 2-layer, 64-dim Whisper with the real 30 s position table and a tiny vocabulary."""
    kwargs = dict(
        num_mel_bins=num_mels,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        max_source_positions=1500,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        max_target_positions=32,
        vocab_size=64,
        # Token ids must fit the tiny vocabulary for save_pretrained's generation config.
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    return WhisperConfig(**(kwargs | overrides))


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter seeded noise, biases included (transformers' init zeroes them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + noise if name.endswith("layer_norm.weight") else noise)
    return module


def mels(batch: int, frames: int, num_mels: int = 80, seed: int = 1) -> torch.Tensor:
    """Seeded stand-in log-mel features `[B, M, T]` in Whisper's value range."""
    gen = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(batch, num_mels, frames, generator=gen)


def reference(hf: HFWhisperEncoder, features: torch.Tensor) -> torch.Tensor:
    """transformers' encoder forward without its 3000-frame check, made of its own modules."""
    x = F.gelu(hf.conv2(F.gelu(hf.conv1(features)))).transpose(1, 2)  # [B, T', D]
    x = x + hf.embed_positions.weight[: x.shape[1]]
    for layer in hf.layers:
        x = layer(x, None)
    return hf.layer_norm(x)


def pair(config: WhisperConfig, seed: int = 0) -> tuple[HFWhisperEncoder, WhisperEncoder]:
    """transformers' encoder with random weights, and ours loaded from its state dict."""
    hf = randomize(HFWhisperEncoder(config), seed).eval()
    ours = build_whisper_encoder(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.fixture(scope="module")
def encoders() -> tuple[HFWhisperEncoder, WhisperEncoder]:
    return pair(tiny_config())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[WhisperForConditionalGeneration, Path]:
    """A tiny random WhisperForConditionalGeneration saved with save_pretrained (safetensors)."""
    path = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_config()).eval()
    randomize(model.model.encoder)
    model.save_pretrained(path)
    return model, path


# --- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_mels, attention, scale_embedding",
    [(80, "sdpa", False), (80, "eager", False), (128, "sdpa", False), (80, "sdpa", True)],
    ids=["80mels", "80mels-eager-reference", "128mels", "scale_embedding"],
)
def test_matches_transformers_on_30s(num_mels, attention, scale_embedding):
    # scale_embedding is a decoder setting: transformers' encoder computes embed_scale, unused.
    config = tiny_config(num_mels, scale_embedding=scale_embedding, attn_implementation=attention)
    hf, ours = pair(config)
    features = mels(1, 3000, num_mels)
    with torch.no_grad():
        expected = hf(features).last_hidden_state
        got, lengths = ours(features)
    assert got.shape == expected.shape == (1, 1500, 64)
    assert lengths.tolist() == [1500]
    diff = (got - expected).abs().max().item()
    assert diff <= PARITY_TOL, f"max abs diff {diff:.2e}"


@pytest.mark.parametrize("frames", [1, 2, 7, 100, 2999, 3000])
def test_any_length_up_to_30s(encoders, frames):
    hf, ours = encoders
    features = mels(2 if frames < 1000 else 1, frames)
    with torch.no_grad():
        got, lengths = ours(features)
        # transformers rejects these lengths, and on zero-padded 30 s input its attention also
        # sees the padding; its own modules without the length check are the reference.
        expected = reference(hf, features)
    out_frames = (frames - 1) // 2 + 1
    assert got.shape == (len(features), out_frames, 64)
    assert lengths.dtype == torch.int64 and lengths.tolist() == [out_frames] * len(features)
    assert torch.isfinite(got).all()
    diff = (got - expected).abs().max().item()
    assert diff <= PARITY_TOL, f"max abs diff {diff:.2e}"


def test_padded_batch_matches_each_clip_alone(encoders):
    _, ours = encoders
    clip_frames = [301, 1, 2, 150, 37, 300]
    # The padding is noise, not zeros: the encoder must ignore whatever is there.
    features = mels(len(clip_frames), max(clip_frames), seed=2)
    lengths = torch.tensor(clip_frames)
    with torch.no_grad():
        batched, out_lengths = ours(features, lengths)
        assert out_lengths.tolist() == [(n - 1) // 2 + 1 for n in clip_frames]
        for i, (n, n_out) in enumerate(zip(clip_frames, out_lengths.tolist(), strict=True)):
            alone, _ = ours(features[i : i + 1, :, :n])
            diff = (batched[i, :n_out] - alone[0]).abs().max().item()
            assert diff <= BATCH_TOL, f"clip {i} ({n} frames): max abs diff {diff:.2e}"
            assert not batched[i, n_out:].any(), "frames past a clip's length must be zero"


def test_full_lengths_match_no_lengths(encoders):
    _, ours = encoders
    features = mels(2, 64)
    with torch.no_grad():
        unmasked, _ = ours(features)
        masked, lengths = ours(features, torch.tensor([64, 64]))
    assert lengths.tolist() == [32, 32]
    torch.testing.assert_close(masked, unmasked, rtol=0, atol=BATCH_TOL)


def test_properties(encoders):
    _, ours = encoders
    assert ours.dim == 64
    assert ours.frame_rate == 50.0
    assert ours.max_frames == 3000
    frames = torch.tensor([1, 2, 3, 100, 2999, 3000])
    assert ours.output_lengths(frames).tolist() == [1, 1, 2, 50, 1500, 1500]


def test_encode_windows_reads_long_clips_window_by_window(encoders):
    """A clip past 30 s is read as its 30 s windows, each encoded alone, outputs joined in
    order; in a batch beside a shorter clip, which comes out as `forward` gives it."""
    _, ours = encoders
    long, short = mels(1, 6500, seed=3), mels(1, 900, seed=4)
    batch = torch.cat([long, F.pad(short, (0, 5600))])
    with torch.no_grad():
        out, lengths = ours.encode_windows(batch, torch.tensor([6500, 900]))
        parts = [ours(long[..., s : s + 3000])[0][0] for s in (0, 3000, 6000)]
        alone, _ = ours(short)
    assert lengths.tolist() == [1500 + 1500 + 250, 450] == [ours.window_output_lengths(f) for f in (6500, 900)]
    torch.testing.assert_close(out[0], torch.cat(parts), rtol=0, atol=BATCH_TOL)
    torch.testing.assert_close(out[1, :450], alone[0], rtol=0, atol=BATCH_TOL)
    assert not out[1, 450:].any()
    with torch.no_grad():  # within one window it is forward itself
        assert torch.equal(ours.encode_windows(short)[0], alone)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [3001, 4000])
def test_rejects_more_than_30s(encoders, frames):
    _, ours = encoders
    with pytest.raises(ValueError, match="3000"):
        ours(mels(1, frames))


@pytest.mark.parametrize(
    "shape, lengths, match",
    [
        ((1, 80, 0), None, "1 to 3000"),
        ((1, 128, 10), None, r"\[B, 80, T\]"),
        ((80, 10), None, r"\[B, 80, T\]"),
        ((2, 80, 10), [10], r"lengths must be \[2\]"),
        ((2, 80, 10), [10.0, 5.0], "integers"),
        ((2, 80, 10), [0, 5], r"\[1, 10\]"),
        ((2, 80, 10), [11, 5], r"\[1, 10\]"),
    ],
    ids=["empty", "wrong-mels", "no-batch", "lengths-shape", "lengths-float", "zero", "too-long"],
)
def test_rejects_bad_input(encoders, shape, lengths, match):
    _, ours = encoders
    lengths = None if lengths is None else torch.tensor(lengths)
    with pytest.raises(ValueError, match=match):
        ours(torch.zeros(shape), lengths)


def test_rejects_unknown_activation():
    with pytest.raises(ValueError, match="'tanh'"):
        build_whisper_encoder(tiny_config(activation_function="tanh"))


# --- loading ----------------------------------------------------------------------------------


def saved_as(layout: str, model: WhisperForConditionalGeneration, path: Path, tmp_path: Path):
    """The checkpoint in `layout`, as load_whisper_encoder's (source, config) arguments."""
    config = model.config
    if layout == "directory":
        return path, None
    if layout == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
        return tmp_path, None
    if layout == "bin":
        config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        return tmp_path, None
    if layout == "safetensors-file":
        return path / "model.safetensors", config
    if layout == "whisper-model":  # keys "encoder.*"
        whisper = WhisperModel(config)
        whisper.load_state_dict(model.model.state_dict())
        return whisper.state_dict(), config
    if layout == "bare-encoder":  # keys without a prefix
        return model.model.encoder.state_dict(), config
    raise AssertionError(layout)


@pytest.mark.parametrize(
    "layout",
    ["directory", "sharded", "bin", "safetensors-file", "whisper-model", "bare-encoder"],
)
def test_load_whisper_checkpoint(checkpoint, tmp_path, layout):
    model, path = checkpoint
    source, config = saved_as(layout, model, path, tmp_path)
    ours = load_whisper_encoder(source, config).eval()
    reference_weights = model.model.encoder.state_dict()
    assert ours.state_dict().keys() == reference_weights.keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, reference_weights[key]), key


def test_loaded_encoder_matches_the_models_encoder(checkpoint):
    model, path = checkpoint
    ours = load_whisper_encoder(path).eval()
    features = mels(1, 3000)
    with torch.no_grad():
        expected = model.model.encoder(features).last_hidden_state
        got, _ = ours(features)
    diff = (got - expected).abs().max().item()
    assert diff <= PARITY_TOL, f"max abs diff {diff:.2e}"


def test_load_rejects_missing_key(checkpoint):
    model, path = checkpoint
    state_dict = load_file(path / "model.safetensors")
    del state_dict["model.encoder.layers.1.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys: layers\.1\.fc2\.bias"):
        load_whisper_encoder(state_dict, model.config)


def test_load_rejects_unexpected_key(checkpoint):
    model, path = checkpoint
    state_dict = load_file(path / "model.safetensors")
    state_dict["model.encoder.layers.0.adapter.weight"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"unexpected keys: layers\.0\.adapter\.weight"):
        load_whisper_encoder(state_dict, model.config)


def test_load_rejects_other_architecture(checkpoint):
    _, path = checkpoint
    shapes = r"conv1\.weight: checkpoint \(64, 80, 3\) vs encoder \(64, 128, 3\)"
    with pytest.raises(ValueError, match=shapes):
        load_whisper_encoder(path / "model.safetensors", tiny_config(num_mels=128))
    with pytest.raises(ValueError, match=r"missing keys: layers\.2\..* and 5 more"):
        load_whisper_encoder(path / "model.safetensors", tiny_config(encoder_layers=3))


def test_load_needs_a_config_and_weights(checkpoint, tmp_path):
    model, path = checkpoint
    with pytest.raises(ValueError, match="config="):
        load_whisper_encoder(model.model.encoder.state_dict())
    with pytest.raises(ValueError, match="config="):
        load_whisper_encoder(path / "model.safetensors")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_whisper_encoder(tmp_path)
