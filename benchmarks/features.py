"""Time voxtune's Whisper log-mel features against transformers' WhisperFeatureExtractor.

Run from the repository root:

    .venv/bin/python benchmarks/features.py [--clips 32] [--repeats 5]

It builds a fixed, seeded set of clips (1-30 s of tones, chirp and noise at 16 kHz), checks
that both implementations agree, then times each method (one warm-up, then the median and the
best of --repeats runs) on the CPU with torch's default thread count, and on CUDA when there is
one. "speed-up" is the baseline's median time divided by the method's.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

import voxtune.audio.features as features_module
from voxtune.audio.features import log_mel, log_mel_batch

SR = 16000


def make_clips(count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` clips of 1-30 s: tones with a syllable-rate envelope, a chirp and noise."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        seconds = rng.uniform(1.0, 30.0)
        t = np.arange(int(seconds * SR)) / SR
        f0 = rng.uniform(90, 250)
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) ** 2
        tones = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 8))
        chirp = 0.3 * np.sin(2 * np.pi * (100 * t + 6900 / (2 * seconds) * t**2))
        x = envelope * tones + chirp + 0.2 * rng.standard_normal(t.shape)
        x *= rng.uniform(0.02, 0.15) / np.sqrt(np.mean(x**2))
        clips.append(x.astype(np.float32))
    return clips


def timeit(fn: Callable[[], object], repeats: int, sync: bool = False) -> tuple[float, float]:
    """(median, best) wall seconds of `fn` over `repeats` runs after one warm-up."""
    fn()
    if sync:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-mels", type=int, default=80)
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    from transformers import WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    fe = WhisperFeatureExtractor(feature_size=args.n_mels)
    clips = make_clips(args.clips)
    audio_s = sum(len(c) for c in clips) / SR
    n_mels = args.n_mels

    def hf_per_clip():
        # truncation=False: with padding=False it would still cut clips to 30 s.
        return [
            fe(c, sampling_rate=SR, padding=False, truncation=False, return_tensors="np")["input_features"][0]
            for c in clips
        ]

    def hf_batched():
        # padding=False cannot batch clips of different lengths; "longest" zero-pads them, which
        # changes each clip's last couple of frames (zeros instead of reflect padding).
        return fe(clips, sampling_rate=SR, padding="longest", truncation=False, return_tensors="np")["input_features"]

    def ours_per_clip(device=None):
        return [log_mel(c, n_mels, device=device) for c in clips]

    def ours_batch(device=None):
        return log_mel_batch(clips, n_mels, device=device)

    def ours_batch_one_stft():
        # What log_mel_batch's CPU chunking (features._CPU_CHUNK_SAMPLES) saves.
        saved, features_module._CPU_CHUNK_SAMPLES = features_module._CPU_CHUNK_SAMPLES, 1 << 40
        try:
            return ours_batch()
        finally:
            features_module._CPU_CHUNK_SAMPLES = saved

    # Agreement first.
    ref = hf_per_clip()
    per_clip = ours_per_clip()
    batch, frames = ours_batch()
    hf_b = hf_batched()
    err_single = max(np.abs(o.numpy() - r).max() for o, r in zip(per_clip, ref, strict=True))
    err_batch = max(np.abs(batch[i, :, : frames[i]].numpy() - r).max() for i, r in enumerate(ref))
    # The batched baseline: all but its last 3 frames per clip, where its zero padding differs.
    err_hf_batch = max(np.abs(hf_b[i, :, : r.shape[1] - 3] - r[:, :-3]).max() for i, r in enumerate(ref))
    assert err_single <= 1e-4 and err_batch <= 1e-4, (err_single, err_batch)

    print(
        f"{len(clips)} clips, {audio_s:.0f} s of 16 kHz audio ({min(map(len, clips)) / SR:.1f}-"
        f"{max(map(len, clips)) / SR:.1f} s), {n_mels} mels; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; median/best of {args.repeats} after a warm-up"
    )
    print(
        f"max |ours - WhisperFeatureExtractor|: log_mel {err_single:.2e}, log_mel_batch "
        f"{err_batch:.2e}; (HF batched vs HF per clip, tails excluded: {err_hf_batch:.2e})"
    )

    rows = [
        ("HF WhisperFeatureExtractor, per clip (baseline)", "cpu", hf_per_clip, False),
        ("HF WhisperFeatureExtractor, batched, padding=longest", "cpu", hf_batched, False),
        ("voxtune log_mel, per clip", "cpu", ours_per_clip, False),
        ("voxtune log_mel_batch", "cpu", ours_batch, False),
        ("voxtune log_mel_batch, forced into one STFT", "cpu", ours_batch_one_stft, False),
    ]
    if torch.cuda.is_available():
        cuda_ref, _ = ours_batch("cuda")
        assert (cuda_ref.cpu() - batch).abs().max() <= 1e-4
        rows += [
            ("voxtune log_mel, per clip (numpy in)", "cuda", lambda: ours_per_clip("cuda"), True),
            ("voxtune log_mel_batch (numpy in)", "cuda", lambda: ours_batch("cuda"), True),
        ]

    baseline = None
    print(f"\n{'method':<54} {'device':<6} {'median s':>9} {'best s':>8} {'x realtime':>11} {'speed-up':>9}")
    for name, device, fn, sync in rows:
        median, best = timeit(fn, args.repeats, sync)
        baseline = baseline or median
        print(
            f"{name:<54} {device:<6} {median:>9.4f} {best:>8.4f} {audio_s / median:>11.0f} {baseline / median:>8.2f}x"
        )


if __name__ == "__main__":
    main()
