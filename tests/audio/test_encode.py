"""voxtune.audio.encode: every output format round-trips with the right length and signal."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from voxtune.audio import (
    CONTENT_TYPES,
    OUTPUT_FORMATS,
    Audio,
    EmptyAudioError,
    NonFiniteAudioError,
    UnsupportedFormatError,
    decode_bytes,
    encode,
    load,
    sniff,
    voices,
)
from voxtune.audio.encode import StreamEncoder

VOICE_RATE = 22050  # what the built-in voice renders at

# format -> (what the bytes sniff as, codec frame in samples at the decoded rate, lossless?)
EXPECTED = {
    "wav": ("wav", 1, True),
    "flac": ("flac", 1, True),
    "mp3": ("mp3", 1152, False),
    "opus": ("opus", 960, False),
    "aac": ("aac", 1024, False),
    "pcm16": (None, 1, True),
}


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_round_trip_keeps_duration_within_one_frame_and_the_signal_close(fmt, make_signal):
    audio = Audio(make_signal(1.7, VOICE_RATE), VOICE_RATE)
    data = encode(audio, fmt)
    sniffed, frame, lossless = EXPECTED[fmt]
    assert sniff(data) == sniffed

    decoded = decode_bytes(data, format=fmt, rate=24000)
    assert decoded.channels == 1
    back = decoded.samples[0]
    if fmt == "pcm16":
        assert decoded.sample_rate == 24000  # the OpenAI convention for headerless PCM
        assert len(data) == 2 * round(len(audio) * 24000 / VOICE_RATE)
    # Compare at the decoded rate: the source resampled there is the reference.
    reference = audio.resample(decoded.sample_rate).samples
    assert abs(len(back) - len(reference)) <= frame
    n = min(len(back), len(reference))
    if lossless:  # 16-bit quantisation is the only loss
        assert np.abs(back[:n] - reference[:n]).max() < 1e-4
    else:
        assert np.corrcoef(back[:n], reference[:n])[0, 1] > 0.98


def test_output_rate_can_be_chosen(make_signal):
    audio = Audio(make_signal(0.5, VOICE_RATE), VOICE_RATE)
    assert decode_bytes(encode(audio, "wav", sample_rate=8000)).sample_rate == 8000
    assert decode_bytes(encode(audio, "mp3", sample_rate=16000)).sample_rate == 16000
    assert len(encode(audio, "pcm16", sample_rate=16000)) == 2 * 8000
    assert len(encode(audio, "pcm", sample_rate=16000)) == 2 * 8000  # /v1/audio/speech's name


def test_every_format_has_a_content_type():
    assert set(CONTENT_TYPES) == set(OUTPUT_FORMATS)
    assert all(value.startswith("audio/") for value in CONTENT_TYPES.values())


def test_bad_requests():
    with pytest.raises(UnsupportedFormatError, match="vorbis"):
        encode(Audio(np.zeros(100, np.float32), 16000), "vorbis")
    with pytest.raises(EmptyAudioError):
        encode(Audio(np.zeros(0, np.float32), 16000), "wav")


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
@pytest.mark.parametrize("count", [1, 20, 300])
def test_very_short_audio_still_encodes(fmt, count):
    audio = Audio(np.full(count, 0.1, np.float32), VOICE_RATE)
    data = encode(audio, fmt)
    assert data
    if fmt != "pcm16":
        assert decode_bytes(data).samples.shape[1] > 0


def test_audio_holds_mono_float32_and_encode_refuses_non_finite():
    audio = Audio(np.zeros(100, dtype=np.float64), 16000)  # converted, so every codec takes it
    assert audio.samples.dtype == np.float32
    assert encode(audio, "mp3")
    with pytest.raises(ValueError, match="1-D"):
        Audio(np.zeros((2, 100), np.float32), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        Audio(np.zeros(100, np.float32), 0)
    with pytest.raises(NonFiniteAudioError):
        encode(Audio(np.array([0.0, np.nan, 0.0], np.float32), 16000), "wav")


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm16"])
def test_a_stream_of_pieces_is_one_file(fmt):
    """Sentences encoded as they come: bytes leave before the end, and the pieces joined decode
    to all the audio."""
    sentences = list(voices.render("Hello there. This is a stream. One more sentence here.", "en"))
    encoder = StreamEncoder(fmt)
    pieces = [encoder.feed(sentence) for sentence in sentences] + [encoder.close()]
    audio = load(b"".join(pieces), 16000, format=fmt, rate=24000 if fmt == "pcm16" else None)
    expected = sum(s.duration for s in sentences)
    assert expected - 0.01 <= audio.duration <= expected + 0.1  # mp3 keeps its few ms of priming
    if fmt == "flac":  # whole, at the end: a streamed FLAC header cannot hold the length
        assert not any(pieces[:-1])
        assert sf.info(io.BytesIO(pieces[-1])).frames == sum(len(s) for s in sentences)  # libsndfile reads it
    else:
        assert sum(1 for piece in pieces[:-1] if piece) >= 2  # out before the stream is closed


def test_a_stream_skips_empty_pieces_and_is_never_empty():
    encoder = StreamEncoder("mp3")
    assert encoder.feed(Audio(np.zeros(0, np.float32), VOICE_RATE)) == b""
    silent = load(encoder.close(), 16000, format="mp3")  # nothing spoken: still a valid file
    assert silent.duration < 0.2
