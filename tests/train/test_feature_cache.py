"""The encoder feature cache: cached == direct, hits skip the encoder, keys and fingerprints
change when they must, bad files are misses, and only the projector trains through it."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from voxtune.audio import Audio
from voxtune.audio.features import log_mel_batch
from voxtune.audio.file_audio import FileAudio
from voxtune.model import tiny
from voxtune.train.feature_cache import (
    EncoderFeatureCache,
    clip_key,
    encode_with_cache,
    encoder_fingerprint,
    project,
    with_cached_audio,
)

RATE = 16000
SECONDS = (0.53, 1.27, 0.9)  # different lengths, none a multiple of the projector's stack


def make_clip(seconds: float, seed: int) -> Audio:
    """Seeded noise plus a tone, 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    samples = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    return Audio(samples.astype(np.float32), RATE)


def frozen(model):
    model.encoder.requires_grad_(False)
    return model


@pytest.fixture(scope="module", params=[("llama", "streaming"), ("qwen2", "whisper")], ids=lambda p: "-".join(p))
def model(request):
    return frozen(tiny(*request.param))


@pytest.fixture
def clips():
    return [make_clip(seconds, seed) for seed, seconds in enumerate(SECONDS)]


def fingerprint_of(model) -> str:
    return encoder_fingerprint(model.encoder, config=model.config.encoder)


@contextlib.contextmanager
def count_encoder_calls(model):
    """Counts the encoder's forward calls while the block runs."""
    calls = [0]
    handle = model.encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def test_cached_equals_embed_audio_and_second_call_hits(model, clips, tmp_path):
    cache = EncoderFeatureCache(tmp_path, fingerprint_of(model))
    augmentations = [None, {"channel": "clean", "gain_db": 3.0}, None]
    features, frames = log_mel_batch(clips, model.config.n_mels)
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad():
        expected = model.embed_audio(features, frames)
        handle = model.projector.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
        first = project(model, encode_with_cache(model, clips, augmentations, cache))
        handle.remove()
    assert (cache.hits, cache.misses, cache.writes) == (0, 3, 3)
    # One row of the clips' frames end to end, each padded to whole stacks only: no batch padding.
    stack = model.projector.stack
    assert shapes == [(1, stack * sum(len(e) for e in expected), model.encoder.dim)]
    for got, want in zip(first, expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # clip by clip vs one padded batch

    with count_encoder_calls(model) as calls, torch.no_grad():
        second = project(model, encode_with_cache(model, clips, augmentations, cache))
    assert calls[0] == 0
    assert (cache.hits, cache.misses) == (3, 3)
    for got, want in zip(second, first, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # exactly what was stored


def test_uncached_path_and_repeated_clip(model, clips, tmp_path):
    cache = EncoderFeatureCache(tmp_path, fingerprint_of(model))
    twice = [clips[0], clips[1], clips[0]]
    with count_encoder_calls(model) as calls:
        cached = encode_with_cache(model, twice, [None] * 3, cache)
    assert calls[0] == 2  # on the CPU clip by clip; the repeated clip is encoded once
    direct = encode_with_cache(model, twice, [None] * 3, None)
    assert cache.misses == 2 and cache.writes == 2
    for a, b in zip(cached, direct, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not any(t.requires_grad for t in cached)


def test_uncached_outputs_carry_no_gradient_even_from_a_trainable_encoder(clips):
    trainable = tiny("llama", "streaming")
    assert any(p.requires_grad for p in trainable.encoder.parameters())
    outputs = encode_with_cache(trainable, clips, [None] * 3, None)
    assert outputs and not any(t.requires_grad for t in outputs)


def test_clips_at_their_own_length_skip_onednn_on_the_cpu(model, clips):
    # oneDNN would build kernels for each new clip length; Whisper's fixed windows reuse them.
    seen: list[bool] = []
    handle = model.encoder.register_forward_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    try:
        encode_with_cache(model, clips, [None] * 3, None)
    finally:
        handle.remove()
    assert seen == [model.config.encoder_kind != "streaming"] * 3
    assert torch.backends.mkldnn.enabled  # on again after


def test_keys_follow_audio_augmentation_and_fingerprint(clips, tmp_path):
    samples, fingerprint = clips[0].samples, "a" * 64
    record = {"channel": "clean", "snr_db": 10.0, "noise": "pink"}
    key = clip_key(clips[0], record, fingerprint)
    reordered = {"noise": "pink", "snr_db": np.float64(10.0), "channel": "clean"}
    assert clip_key(clips[0], reordered, fingerprint) == key  # canonical JSON
    assert clip_key(Audio(samples.copy(), RATE), dict(record), fingerprint) == key
    # A file's audio, held or let go, keys as its samples do: it need not be decoded again.
    path = tmp_path / "clip.wav"
    sf.write(path, samples, RATE, subtype="FLOAT")
    read = FileAudio.read(path, RATE)
    assert clip_key(read, record, fingerprint) == clip_key(read.without_samples(), record, fingerprint) == key
    others = [
        clip_key(clips[0], {**record, "snr_db": 11.0}, fingerprint),
        clip_key(clips[0], None, fingerprint),
        clip_key(clips[1], record, fingerprint),
        clip_key(Audio(samples[:-1], RATE), record, fingerprint),
        clip_key(Audio(samples, 8000), record, fingerprint),
        clip_key(clips[0], record, "b" * 64),
    ]
    assert len({key, *others}) == 1 + len(others)


def test_changed_encoder_changes_fingerprint_and_misses(model, clips, tmp_path):
    fingerprint = fingerprint_of(model)
    assert fingerprint_of(model) == fingerprint  # stable
    encode_with_cache(model, clips, [None] * 3, EncoderFeatureCache(tmp_path, fingerprint))
    weight = next(model.encoder.parameters())
    original = weight.view(-1)[0].item()
    with torch.no_grad():
        weight.view(-1)[0] = original + 1e-3
    try:
        changed = fingerprint_of(model)
        assert changed != fingerprint
        cache = EncoderFeatureCache(tmp_path, changed)
        encode_with_cache(model, clips, [None] * 3, cache)
        assert (cache.hits, cache.misses) == (0, 3)
    finally:
        with torch.no_grad():
            weight.view(-1)[0] = original  # the fixture's model is shared: restore it exactly
    assert fingerprint_of(model) == fingerprint
    # The config counts too: a setting the weights do not show is a different encoder.
    assert encoder_fingerprint(model.encoder, config={"other": 1}) != fingerprint


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "wrong-key"])
def test_bad_file_is_a_miss_and_is_rewritten(model, clips, tmp_path, damage):
    cache = EncoderFeatureCache(tmp_path, fingerprint_of(model))
    (expected,) = encode_with_cache(model, clips[:1], [None], cache)
    key = clip_key(clips[0], None, cache.fingerprint)
    path = cache.path(key)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 5)
    elif damage == "flip":  # a valid file with one wrong byte in the tensor data
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:  # a whole, valid entry, but for another clip
        other = clip_key(clips[1], None, cache.fingerprint)
        encode_with_cache(model, clips[1:2], [None], cache)
        path.write_bytes(cache.path(other).read_bytes())

    assert cache.get(key) is None
    assert cache.corrupt == 1 and not path.exists()
    (again,) = encode_with_cache(model, clips[:1], [None], cache)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache.get(key), expected.cpu(), atol=0, rtol=0)  # rewritten, whole


def test_prune_removes_other_fingerprints_only(tmp_path):
    old, current = EncoderFeatureCache(tmp_path, "0" * 64), EncoderFeatureCache(tmp_path, "1" * 64)
    old.put("2" * 64, torch.ones(3, 4))
    current.put("3" * 64, torch.ones(3, 4))
    (tmp_path / "not-a-cache").mkdir()
    assert current.prune() == ["0" * 64]
    assert not old.folder.exists()
    assert current.get("3" * 64) is not None
    assert (tmp_path / "not-a-cache").is_dir()


def test_max_bytes_stops_writing(tmp_path):
    cache = EncoderFeatureCache(tmp_path, "0" * 64, max_bytes=1000)
    assert cache.put("1" * 64, torch.zeros(10, 8))  # ~0.5 kB with its header
    assert not cache.put("2" * 64, torch.zeros(10, 8))
    assert (cache.writes, cache.skipped) == (1, 1)
    reopened = EncoderFeatureCache(tmp_path, "0" * 64, max_bytes=1000)  # sees what is on disk
    assert not reopened.put("3" * 64, torch.zeros(10, 8))


def test_concurrent_writers_of_one_key(tmp_path):
    cache = EncoderFeatureCache(tmp_path, "0" * 64)
    tensor = torch.arange(4000, dtype=torch.float32).view(100, 40)
    threads = [threading.Thread(target=cache.put, args=("5" * 64, tensor)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(cache.get("5" * 64), tensor, atol=0, rtol=0)
    assert [p.name for p in cache.path("5" * 64).parent.iterdir()] == [f"{'5' * 64}.safetensors"]


def test_gradients_reach_the_projector_not_the_encoder(model, clips, tmp_path):
    cache = EncoderFeatureCache(tmp_path, fingerprint_of(model))
    model.zero_grad(set_to_none=True)
    for _ in range(2):  # a miss, then a hit: both train the projector
        tokens = project(model, encode_with_cache(model, clips, [None] * 3, cache))
        torch.cat(tokens).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
        assert all(p.grad is None for p in model.encoder.parameters())
        model.zero_grad(set_to_none=True)


def test_trainable_encoder_is_refused(clips, tmp_path):
    model = tiny("llama", "streaming")
    cache = EncoderFeatureCache(tmp_path, fingerprint_of(model))
    with pytest.raises(ValueError, match="freeze"):
        encode_with_cache(model, clips, [None] * 3, cache)


def test_with_cached_audio_gives_the_same_loss(model, clips, tmp_path):
    cache = EncoderFeatureCache(tmp_path, fingerprint_of(model))
    prompt = {"type": "text", "text": "Please transcribe the audio."}
    examples = [
        model.processor.encode_messages(
            [
                {"role": "user", "content": [prompt, {"type": "audio", "audio": clip}]},
                {"role": "assistant", "content": "one two three"},
            ],
            with_labels=True,
        )
        for clip in clips[:2]
    ]
    examples[1].info["augmentation"] = {"channel": "clean"}
    batch = model.processor.collate(examples)
    with torch.no_grad():
        expected = model(batch).loss
        for _ in range(2):
            got = model(with_cached_audio(batch, model, examples, cache)).loss
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (cache.misses, cache.hits) == (2, 2)
