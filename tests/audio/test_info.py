"""voxtune.audio.describe: format, rate, channels, duration and levels of a file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

from voxtune.audio import AudioFileNotFoundError, UndecodableAudioError, describe


def _sine(level: float, seconds: float = 1.0, rate: int = 44100) -> np.ndarray:
    return (level * np.sin(2 * np.pi * 441 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_levels_of_a_stereo_sine(tmp_path):
    path = tmp_path / "sine.flac"
    sf.write(path, np.stack([_sine(0.5), _sine(0.5)], axis=1), 44100, subtype="PCM_24")
    info = describe(path)
    assert (info.container, info.codec) == ("flac", "pcm_24")
    assert (info.sample_rate, info.channels) == (44100, 2)
    assert info.duration == pytest.approx(1.0)
    assert info.peak_dbfs == pytest.approx(20 * math.log10(0.5), abs=0.01)  # -6.02
    assert info.rms_dbfs == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.01)  # -9.03
    assert not info.silent and not info.clipped


def test_silence_and_clipping_are_flagged(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    silent = describe(tmp_path / "silent.wav")
    assert silent.silent and not silent.clipped
    assert silent.to_dict()["peak_dbfs"] is None  # -inf is not JSON

    sf.write(tmp_path / "quiet.wav", _sine(0.0005), 44100)
    assert describe(tmp_path / "quiet.wav").silent  # -69 dBFS RMS

    sf.write(tmp_path / "clipped.wav", np.clip(_sine(3.0), -1, 1), 44100)
    assert describe(tmp_path / "clipped.wav").clipped
    sf.write(tmp_path / "full-scale.wav", _sine(0.999), 44100)  # touches the top, never flat
    assert not describe(tmp_path / "full-scale.wav").clipped


def test_float_files_over_full_scale_or_with_nan(tmp_path):
    sf.write(tmp_path / "hot.wav", _sine(1.5), 44100, subtype="FLOAT")
    hot = describe(tmp_path / "hot.wav")
    assert hot.clipped and hot.peak_dbfs == pytest.approx(3.52, abs=0.01)
    samples = _sine(0.5)
    samples[100:200] = np.nan
    sf.write(tmp_path / "nan.wav", samples, 44100, subtype="FLOAT")
    info = describe(tmp_path / "nan.wav")
    assert info.non_finite and not info.silent
    assert info.peak_dbfs == pytest.approx(-6.02, abs=0.01)


def test_bad_files(tmp_path):
    with pytest.raises(AudioFileNotFoundError):
        describe(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(UndecodableAudioError):
        describe(tmp_path / "text.wav")
    with pytest.raises(UndecodableAudioError, match="directory"):
        describe(tmp_path)
