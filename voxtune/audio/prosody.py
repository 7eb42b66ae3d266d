"""Prosody measurements: fundamental frequency (pitch) per frame, with the YIN method.

Pitch contour is what emotion and intent are read from later; here it also lets tests check
that voice styles change pitch the way a listener would hear.
"""

from __future__ import annotations

import numpy as np

from voxtune.audio.audio import Audio


def pitch(
    audio: Audio,
    *,
    fmin: float = 60.0,
    fmax: float = 500.0,
    hop_seconds: float = 0.01,
    threshold: float = 0.15,
    silence_db: float = -45.0,
) -> np.ndarray:
    """Fundamental frequency in Hz per `hop_seconds` frame; NaN where the frame is unvoiced.

    YIN (de Cheveigné and Kawahara, 2002): the cumulative-mean-normalised difference function,
    the first lag under `threshold` refined to its local minimum and by parabolic interpolation.
    Frames quieter than `silence_db` (RMS, dBFS) are unvoiced.
    """
    if not 0 < fmin < fmax < audio.sample_rate / 2:
        raise ValueError(f"need 0 < fmin < fmax < sample_rate / 2, got fmin={fmin}, fmax={fmax}")
    sr = audio.sample_rate
    tau_min, tau_max = int(sr / fmax), int(np.ceil(sr / fmin))
    window = tau_max  # integrate over one longest period
    hop = max(1, int(round(hop_seconds * sr)))
    length = window + tau_max
    x = audio.samples.astype(np.float64)
    if len(x) < length:
        return np.full(0, np.nan)
    count = 1 + (len(x) - length) // hop
    frames = np.lib.stride_tricks.sliding_window_view(x, length)[::hop][:count]  # [T, L]

    # d(tau) = e(0) + e(tau) - 2 c(tau), with e the window energy at lag tau and c the
    # cross-correlation of the first window with the frame (through the FFT).
    squares = np.concatenate([np.zeros((count, 1)), np.cumsum(frames**2, axis=1)], axis=1)
    lags = np.arange(tau_max + 1)
    energy = squares[:, lags + window] - squares[:, lags]  # [T, tau_max + 1]
    n_fft = 1 << int(np.ceil(np.log2(length + window)))
    spectrum = np.fft.rfft(frames, n_fft) * np.conj(np.fft.rfft(frames[:, :window], n_fft))
    cross = np.fft.irfft(spectrum, n_fft)[:, : tau_max + 1]
    diff = np.maximum(energy[:, :1] + energy - 2 * cross, 0.0)

    cumulative = np.cumsum(diff[:, 1:], axis=1)
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] * lags[1:] / np.maximum(cumulative, 1e-12)

    f0 = np.full(count, np.nan)
    rms_db = 10 * np.log10(np.maximum(energy[:, 0] / window, 1e-20))
    for t in np.flatnonzero(rms_db > silence_db):
        below = np.flatnonzero(cmnd[t, tau_min:] < threshold)
        if below.size == 0:
            continue
        tau = tau_min + below[0]
        while tau + 1 <= tau_max and cmnd[t, tau + 1] < cmnd[t, tau]:
            tau += 1
        f0[t] = sr / _parabolic(cmnd[t], tau)
    return f0


def _parabolic(curve: np.ndarray, i: int) -> float:
    """Sub-sample position of the minimum near index `i`."""
    if i <= 0 or i >= len(curve) - 1:
        return float(i)
    left, mid, right = curve[i - 1], curve[i], curve[i + 1]
    denom = left - 2 * mid + right
    return float(i) if denom == 0 else i + 0.5 * (left - right) / denom
