"""voxtune.audio.tempo.change_tempo: length scales, pitch stays."""

from __future__ import annotations

import numpy as np
import pytest

from voxtune.audio import Audio
from voxtune.audio.prosody import pitch
from voxtune.audio.tempo import change_tempo


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.5, 4.0])
def test_length_scales_and_pitch_stays(factor):
    rate = 16000
    t = np.arange(2 * rate) / rate
    tone = Audio((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate)
    out = change_tempo(tone, factor)
    assert out.duration == pytest.approx(2.0 / factor, rel=0.03)
    assert np.nanmedian(pitch(out)) == pytest.approx(200, rel=0.01)


@pytest.mark.parametrize("factor", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_factors(factor):
    with pytest.raises(ValueError, match="positive finite"):
        change_tempo(Audio(np.zeros(1000, np.float32), 16000), factor)
