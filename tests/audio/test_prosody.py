"""voxtune.audio.prosody.pitch: YIN F0 on signals whose pitch is known."""

from __future__ import annotations

import numpy as np
import pytest

from voxtune.audio import Audio
from voxtune.audio.prosody import pitch


@pytest.mark.parametrize("f0", [80.0, 155.0, 220.0, 440.0])
def test_pitch_of_a_harmonic_tone(f0):
    rate = 16000
    t = np.arange(rate) / rate
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    track = pitch(Audio((0.3 * tone).astype(np.float32), rate))
    assert len(track) == pytest.approx(100, abs=5)  # 10 ms frames
    assert np.isnan(track).mean() < 0.02
    assert np.nanmedian(track) == pytest.approx(f0, rel=0.005)


def test_pitch_follows_a_glide():
    rate = 16000
    t = np.arange(2 * rate) / rate
    f0 = 120 + 60 * t  # 120 -> 240 Hz over two seconds
    tone = np.sin(2 * np.pi * np.cumsum(f0) / rate)
    track = pitch(Audio((0.3 * tone).astype(np.float32), rate))
    first, last = np.nanmedian(track[:20]), np.nanmedian(track[-20:])
    assert first == pytest.approx(126, rel=0.03) and last == pytest.approx(234, rel=0.03)


def test_silence_and_noise_are_unvoiced():
    rate = 16000
    assert np.isnan(pitch(Audio(np.zeros(rate, np.float32), rate))).all()
    noise = np.random.default_rng(0).standard_normal(rate).astype(np.float32) * 0.1
    assert np.isnan(pitch(Audio(noise, rate))).mean() > 0.9
    assert len(pitch(Audio(np.zeros(100, np.float32), rate))) == 0  # shorter than one frame


def test_bad_ranges_are_refused():
    audio = Audio(np.zeros(16000, np.float32), 16000)
    for fmin, fmax in ((0, 500), (300, 200), (60, 9000)):
        with pytest.raises(ValueError, match="fmin"):
            pitch(audio, fmin=fmin, fmax=fmax)
