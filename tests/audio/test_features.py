"""Whisper log-mel features: parity with transformers' WhisperFeatureExtractor, batching, inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from voxtune.audio.audio import Audio, resample
from voxtune.audio.features import CAUSAL_FLOOR, MIN_SAMPLES, log_mel, log_mel_batch, mel_filters

SR = 16000
TOL = 1e-4


def speechlike(seconds: float, seed: int = 0, sample_rate: int = SR, noise: float = 0.2) -> np.ndarray:
    """Tones with a syllable-rate envelope, a chirp and seeded noise, at about -22 dBFS RMS."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t) ** 2
    tones = sum(a * np.sin(2 * np.pi * f * t) for f, a in ((180, 1.0), (720, 0.5), (2600, 0.25)))
    top = min(7000.0, 0.45 * sample_rate)
    chirp = 0.3 * np.sin(2 * np.pi * (100 * t + (top - 100) / (2 * max(seconds, 1e-3)) * t**2))
    x = envelope * tones + chirp + noise * rng.standard_normal(t.shape)
    x *= 0.08 / np.sqrt(np.mean(x**2))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def extractors() -> dict[int, WhisperFeatureExtractor]:
    return {n: WhisperFeatureExtractor(feature_size=n) for n in (80, 128)}


def reference(extractors, samples: np.ndarray, n_mels: int) -> np.ndarray:
    # truncation=False: with padding=False the extractor still cuts clips to 30 s by default.
    out = extractors[n_mels](samples, sampling_rate=SR, padding=False, truncation=False, return_tensors="np")
    return out["input_features"][0]


# --- mel filters -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    ref = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    ).T  # transformers: [F, M]; ours: [M, F]
    ours = mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)
    ours64 = mel_filters(n_mels, dtype=torch.float64)
    np.testing.assert_allclose(ours64.numpy(), ref, rtol=0, atol=1e-12)


def test_mel_filters_are_cached():
    assert mel_filters(80) is mel_filters(80)
    assert mel_filters(80) is not mel_filters(128)


def test_mel_filters_reject_low_sample_rate():
    with pytest.raises(ValueError, match="sample_rate"):
        mel_filters(80, sample_rate=8000)


# --- parity with WhisperFeatureExtractor -----------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [0.05, 1.3, 7.0, 30.0, 33.0])
def test_log_mel_matches_whisper(extractors, n_mels, seconds):
    x = speechlike(seconds, seed=int(seconds * 10))
    ref = reference(extractors, x, n_mels)
    ours = log_mel(x, n_mels)
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape == (n_mels, len(x) // 160)
    assert np.abs(ours.numpy() - ref).max() <= TOL


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_near_silence(extractors, n_mels):
    rng = np.random.default_rng(7)
    x = (1e-5 * rng.standard_normal(SR * 2)).astype(np.float32)  # about -100 dBFS
    x[SR // 2 : SR] = 0.0  # digital silence inside, where the 1e-10 clamp applies
    ref = reference(extractors, x, n_mels)
    ours = log_mel(x, n_mels).numpy()
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("n", [MIN_SAMPLES, 359, 16000, 16159, 16160, 16161])
def test_frames_are_samples_over_hop(extractors, n):
    x = speechlike(n / SR, seed=n)
    ours = log_mel(x)
    assert ours.shape == (80, n // 160)
    assert np.abs(ours.numpy() - reference(extractors, x, 80)).max() <= TOL


# --- inputs ----------------------------------------------------------------------------------


def test_input_kinds_agree():
    x = speechlike(1.0, seed=3)
    expected = log_mel(x)
    torch.testing.assert_close(log_mel(torch.from_numpy(x)), expected, rtol=0, atol=0)
    torch.testing.assert_close(log_mel(x.astype(np.float64)), expected, rtol=0, atol=0)
    torch.testing.assert_close(log_mel(Audio(x, SR)), expected, rtol=0, atol=0)


def test_read_only_array_is_accepted_without_warning():
    x = speechlike(0.5, seed=5)
    frozen = np.frombuffer(x.tobytes(), dtype=np.float32)  # read-only, as decoded buffers are
    assert not frozen.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = log_mel(frozen)
    torch.testing.assert_close(out, log_mel(x), rtol=0, atol=0)


def test_audio_at_44k1_is_resampled():
    # No noise here: noise drawn at 44.1 kHz is not the same noise as drawn at 16 kHz.
    x44 = speechlike(1.5, sample_rate=44100, noise=0.0)
    audio = Audio(x44, 44100)
    ours = log_mel(audio)
    x16 = resample(x44, 44100, SR)
    assert ours.shape == (80, len(x16) // 160) == (80, 150)
    torch.testing.assert_close(ours, log_mel(x16), rtol=0, atol=0)
    # The features describe the same sound as the 16 kHz rendering of the same signal.
    same = log_mel(speechlike(1.5, noise=0.0))
    # (soxr's filter settles over the first and last few milliseconds, hence the edge frames' slack)
    diff = (ours - same).abs()
    assert diff.mean() < 0.01
    assert diff[:, 2:-2].max() < 0.01


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros(0, np.float32), "empty"),
        (torch.zeros(0), "empty"),
        (np.zeros(MIN_SAMPLES - 1, np.float32), "at least 201"),
        (np.zeros(159, np.float32), "at least 201"),
        (np.zeros((2, 16000), np.float32), "1-D"),
        (torch.zeros(1, 16000), "1-D"),
        (np.zeros(16000, np.int16), "floating point"),
        ([0.0] * 16000, "one clip"),
        ("speech.wav", "expected an Audio"),
    ],
)
def test_bad_inputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        log_mel(bad)


def test_bad_batches_raise():
    with pytest.raises(ValueError, match="no clips"):
        log_mel_batch([])
    with pytest.raises(ValueError, match="sequence of clips"):
        log_mel_batch(np.zeros(16000, np.float32))
    with pytest.raises(ValueError, match="clip 1.*at least 201"):
        log_mel_batch([np.zeros(16000, np.float32), np.zeros(100, np.float32)])


# --- batching --------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_batch_rows_equal_single_clips(n_mels):
    rng = np.random.default_rng(11)
    lengths = [16000 * 3 + 77, MIN_SAMPLES, 16000 * 12, 5123, 16000 * 12 - 1]
    clips = [speechlike(n / SR, seed=i) for i, n in enumerate(lengths)]
    clips[3] = (1e-6 * rng.standard_normal(lengths[3])).astype(np.float32)  # near-silent row
    clips[1] = Audio(clips[1], SR)  # kinds may be mixed
    clips[4] = torch.from_numpy(clips[4])

    features, frames = log_mel_batch(clips, n_mels)
    assert features.shape == (len(clips), n_mels, max(lengths) // 160)
    assert frames.dtype == torch.int64
    assert frames.tolist() == [n // 160 for n in lengths]
    for row, clip in enumerate(clips):
        single = log_mel(clip, n_mels)
        t = int(frames[row])
        torch.testing.assert_close(features[row, :, :t], single, rtol=0, atol=1e-5)
        # Past the clip's end: its floor, (max - 8 + 4) / 4 = max feature - 2.
        pad = features[row, :, t:]
        torch.testing.assert_close(pad, torch.full_like(pad, single.max().item() - 2.0))


def test_batch_chunking_does_not_change_results(monkeypatch):
    import voxtune.audio.features as features_module

    clips = [speechlike(s, seed=i) for i, s in enumerate((2.0, 0.02, 9.0, 4.5, 9.0))]
    monkeypatch.setattr(features_module, "_CPU_CHUNK_SAMPLES", 1 << 40)  # one STFT
    one, one_frames = log_mel_batch(clips)
    monkeypatch.setattr(features_module, "_CPU_CHUNK_SAMPLES", 1)  # one STFT per clip
    many, many_frames = log_mel_batch(clips)
    assert one_frames.tolist() == many_frames.tolist()
    torch.testing.assert_close(many, one, rtol=0, atol=1e-5)


def test_batch_matches_whisper(extractors):
    clips = [speechlike(s, seed=i) for i, s in enumerate((2.5, 0.3, 4.0))]
    features, frames = log_mel_batch(clips)
    for row, clip in enumerate(clips):
        ref = reference(extractors, clip, 80)
        assert np.abs(features[row, :, : frames[row]].numpy() - ref).max() <= TOL


# --- device ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    clips = [speechlike(s, seed=i) for i, s in enumerate((1.3, 7.0, 30.0))]
    cpu, cpu_frames = log_mel_batch(clips)
    gpu, gpu_frames = log_mel_batch(clips, device="cuda")
    assert gpu.device.type == "cuda" and gpu_frames.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=TOL)
    assert gpu_frames.cpu().tolist() == cpu_frames.tolist()
    single = log_mel(torch.from_numpy(clips[0]).cuda())  # device follows the tensor
    assert single.device.type == "cuda"
    torch.testing.assert_close(single.cpu(), cpu[0, :, : cpu_frames[0]], rtol=0, atol=TOL)


def test_a_fixed_floor_makes_features_causal():
    """With the causal floor, a stream's features are its beginning's: louder audio later
    changes nothing already computed (but the frames whose window reaches the cut). Whisper's
    own per-clip floor does change them."""
    rng = np.random.default_rng(5)
    quiet = (0.01 * rng.standard_normal(16000)).astype(np.float32)
    quiet[4000:6000] = 0.0  # digital silence: what the floor decides
    loud = (0.5 * rng.standard_normal(16000)).astype(np.float32)
    whole = np.concatenate([quiet, loud])
    settled = (len(quiet) - 200) // 160  # frames whose window ends inside the quiet part
    causal = log_mel(quiet, floor=CAUSAL_FLOOR)[:, :settled]
    assert torch.equal(causal, log_mel(whole, floor=CAUSAL_FLOOR)[:, :settled])
    assert float(causal.min()) == pytest.approx((CAUSAL_FLOOR + 4) / 4)
    assert not torch.equal(log_mel(quiet)[:, :settled], log_mel(whole)[:, :settled])
    # Batches and padding follow the same floor.
    batch, frames = log_mel_batch([quiet, whole], floor=CAUSAL_FLOOR)
    assert torch.equal(batch[0, :, : frames[0]], log_mel(quiet, floor=CAUSAL_FLOOR))
    assert float(batch[0, :, frames[0] :].max()) == pytest.approx((CAUSAL_FLOOR + 4) / 4)


def test_the_causal_floor_leaves_ordinary_speech_as_whisper_sees_it():
    """A clip peaking at 1 (log10) is floored at -7 either way: the two are the same features."""
    rng = np.random.default_rng(6)
    samples = (0.05 * rng.standard_normal(16000)).astype(np.float32)
    peak = float(log_mel(samples).max()) * 4 - 4  # back to log10
    scaled = samples * np.float32(10 ** ((1.0 - peak) / 2))  # power scales with the square
    assert torch.allclose(log_mel(scaled), log_mel(scaled, floor=CAUSAL_FLOOR), atol=1e-3)
