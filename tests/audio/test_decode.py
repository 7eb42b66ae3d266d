"""voxtune.audio.load: every input format and source kind, and every way audio can be bad."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import pytest
import soundfile as sf

from voxtune.audio import (
    Audio,
    AudioError,
    AudioFileNotFoundError,
    AudioTooLongError,
    EmptyAudioError,
    FormatMismatchError,
    NonFiniteAudioError,
    UndecodableAudioError,
    UnsupportedFormatError,
    ZeroLengthAudioError,
    decode_bytes,
    load,
    resample,
    sniff,
)

RATE = 44100
SECONDS = 1.5


def _soundfile_bytes(samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _ffmpeg_bytes(samples: np.ndarray, rate: int, container: str, codec: str, codec_rate: int) -> bytes:
    """Encode `[frames]` or `[frames, 2]` float samples with FFmpeg directly (the reference,
    independent of voxtune.audio.encode)."""
    layout = "mono" if samples.ndim == 1 else "stereo"
    interleaved = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)  # [1, frames * channels]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=codec_rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(interleaved, format="flt", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=codec_rate)
        for converted in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(converted))
        out.mux(stream.encode(None))
    return buffer.getvalue()


# name -> (make bytes from stereo float [frames, 2] at RATE, sniffed format, lossless?)
FORMATS = {
    "wav-u8": (lambda s: _soundfile_bytes(s, RATE, "WAV", "PCM_U8"), "wav", False),
    "wav-16": (lambda s: _soundfile_bytes(s, RATE, "WAV", "PCM_16"), "wav", True),
    "wav-24": (lambda s: _soundfile_bytes(s, RATE, "WAV", "PCM_24"), "wav", True),
    "wav-32": (lambda s: _soundfile_bytes(s, RATE, "WAV", "PCM_32"), "wav", True),
    "wav-float": (lambda s: _soundfile_bytes(s, RATE, "WAV", "FLOAT"), "wav", True),
    "wav-mulaw": (lambda s: _soundfile_bytes(s, 8000, "WAV", "ULAW"), "wav", False),
    "wav-alaw": (lambda s: _soundfile_bytes(s, 8000, "WAV", "ALAW"), "wav", False),
    "flac": (lambda s: _soundfile_bytes(s, RATE, "FLAC", "PCM_16"), "flac", True),
    "ogg-vorbis": (lambda s: _soundfile_bytes(s, RATE, "OGG", "VORBIS"), "ogg", False),
    "ogg-opus": (lambda s: _ffmpeg_bytes(s, RATE, "ogg", "libopus", 48000), "opus", False),
    "webm-opus": (lambda s: _ffmpeg_bytes(s, RATE, "webm", "libopus", 48000), "webm", False),
    "mp3": (lambda s: _ffmpeg_bytes(s, RATE, "mp3", "libmp3lame", RATE), "mp3", False),
    "m4a-aac": (lambda s: _ffmpeg_bytes(s, RATE, "ipod", "aac", RATE), "mp4", False),
    "adts-aac": (lambda s: _ffmpeg_bytes(s, RATE, "adts", "aac", RATE), "aac", False),
}


def _expected(stereo: np.ndarray, rate: int) -> np.ndarray:
    """What load() should return: the channel mean at 16 kHz."""
    return resample(stereo.mean(axis=1).astype(np.float32), rate, 16000)


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_decodes_to_16k_mono_close_to_the_source(name, make_signal):
    make, sniffed, lossless = FORMATS[name]
    source_rate = 8000 if name in ("wav-mulaw", "wav-alaw") else RATE
    stereo = make_signal(SECONDS, source_rate, channels=2)
    data = make(stereo)
    assert sniff(data) == sniffed

    audio = load(data)
    assert audio.sample_rate == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert np.abs(audio.samples).max() <= 1.0
    # Codec delay and padding are trimmed: the length is right to within one codec frame
    # (2048 samples at 44.1 kHz is at most 743 samples at 16 kHz).
    expected = _expected(stereo, source_rate)
    assert abs(len(audio) - len(expected)) <= (1 if lossless else 743)
    n = min(len(audio), len(expected))
    if lossless:
        assert np.abs(audio.samples[:n] - expected[:n]).max() < 2e-3
    else:
        assert np.corrcoef(audio.samples[:n], expected[:n])[0, 1] > 0.95


def test_format_is_detected_from_bytes_not_file_name(tmp_path, make_signal):
    path = tmp_path / "actually-a-wav.mp3"
    path.write_bytes(_soundfile_bytes(make_signal(0.5, 16000), 16000, "WAV", "PCM_16"))
    audio = load(str(path))
    assert len(audio) == 8000
    assert decode_bytes(path.read_bytes()).container == "wav"


def test_every_source_kind_gives_the_same_audio(tmp_path, make_signal):
    mono = make_signal(0.5, 16000)
    data = _soundfile_bytes(mono, 16000, "WAV", "PCM_16")
    path = tmp_path / "clip.wav"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    reference = load(data).samples
    for source in (str(path), path, b64, f"data:audio/wav;base64,{b64}", bytearray(data)):
        assert np.array_equal(load(source).samples, reference)
    # Arrays: float, int16, (frames, channels) and (channels, frames).
    pcm = np.round(mono * 32767).astype(np.int16)
    assert np.abs(load(pcm, rate=16000).samples - mono).max() < 1e-4
    assert np.array_equal(load(np.stack([mono, mono], axis=1), rate=16000).samples, mono)
    assert np.array_equal(load(np.stack([mono, mono], axis=0), rate=16000).samples, mono)
    assert load(Audio(mono, 16000), sample_rate=8000).sample_rate == 8000


def test_headerless_pcm16_needs_its_rate(make_signal):
    mono = make_signal(0.5, 24000)
    data = np.round(mono * 32767).astype("<i2").tobytes()
    audio = load(data, format="pcm16", rate=24000)
    assert audio.sample_rate == 16000 and len(audio) == 8000
    with pytest.raises(AudioError, match="rate"):
        load(data, format="pcm16")
    with pytest.raises(UndecodableAudioError, match="16-bit"):
        load(data[:-1], format="pcm16", rate=24000)
    with pytest.raises(UndecodableAudioError, match="pcm16"):
        load(data)  # without format, raw bytes are not guessed at


def test_stereo_is_mixed_to_mono():
    t = np.arange(16000) / 16000
    left = 0.5 * np.sin(2 * np.pi * 300 * t)
    out = load(np.stack([left, -left], axis=1).astype(np.float32), rate=16000)
    assert np.abs(out.samples).max() < 1e-6


def test_resampling_keeps_the_band_and_removes_aliases():
    t = np.arange(RATE) / RATE
    kept = load((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), rate=RATE)
    spectrum = np.abs(np.fft.rfft(kept.samples))
    assert abs(np.argmax(spectrum) * 16000 / len(kept) - 1000) < 2
    assert abs(np.sqrt(np.mean(kept.samples[100:-100] ** 2)) - 0.5 / np.sqrt(2)) < 5e-3
    # 12 kHz is above the 8 kHz Nyquist of 16 kHz audio: it must be filtered, not folded to 4 kHz.
    aliased = load((0.5 * np.sin(2 * np.pi * 12000 * t)).astype(np.float32), rate=RATE)
    assert np.sqrt(np.mean(aliased.samples[100:-100] ** 2)) < 1e-3


def test_wav_with_a_codec_libsndfile_lacks_falls_back_to_ffmpeg():
    # G.722 (wideband telephony) in a WAV container: libsndfile refuses it, FFmpeg reads it.
    t = np.arange(16000) / 16000
    tone = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    data = _ffmpeg_bytes(tone, 16000, "wav", "adpcm_g722", 16000)
    with pytest.raises(sf.LibsndfileError):
        sf.info(io.BytesIO(data))
    assert decode_bytes(data).codec == "g722"
    audio = load(data)
    assert abs(len(audio) - 16000) <= 160
    spectrum = np.abs(np.fft.rfft(audio.samples))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 3


def test_telephone_audio_loads():
    t = np.arange(8000) / 8000
    data = _soundfile_bytes((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000, "WAV", "ULAW")
    audio = load(data)
    assert audio.sample_rate == 16000 and abs(audio.duration - 1.0) < 1e-3


@pytest.mark.parametrize(
    "source, error",
    [
        (b"", EmptyAudioError),
        ("", EmptyAudioError),
        (np.zeros(0, dtype=np.float32), EmptyAudioError),
        (b"this is not audio at all", UndecodableAudioError),
        (b"fLaC\x00\x00\x00\x22" + b"\x00" * 30, UndecodableAudioError),  # truncated FLAC
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", UndecodableAudioError),  # truncated WAV header
        ("/no/such/file.wav", AudioFileNotFoundError),
    ],
    ids=["empty-bytes", "empty-string", "empty-array", "garbage", "truncated-flac", "truncated-wav", "missing-file"],
)
def test_bad_sources_raise_a_specific_audio_error(source, error):
    with pytest.raises(error) as raised:
        load(source, rate=16000)
    assert isinstance(raised.value, AudioError) and isinstance(raised.value, ValueError)
    assert "\n" not in str(raised.value)


def test_zero_length_wav():
    with pytest.raises(ZeroLengthAudioError):
        load(_soundfile_bytes(np.zeros(0, dtype=np.float32), 16000, "WAV", "PCM_16"))


def test_non_finite_samples():
    samples = np.zeros(1600, dtype=np.float32)
    samples[10] = np.nan
    with pytest.raises(NonFiniteAudioError):
        load(_soundfile_bytes(samples, 16000, "WAV", "FLOAT"))
    samples[10] = np.inf
    with pytest.raises(NonFiniteAudioError):
        load(samples, rate=16000)


def test_too_long_is_refused_before_and_while_decoding(make_signal):
    stereo = make_signal(2.0, RATE, channels=2)
    with pytest.raises(AudioTooLongError, match="limit"):
        load(_soundfile_bytes(stereo, RATE, "WAV", "PCM_16"), max_duration=1.0)
    with pytest.raises(AudioTooLongError):
        load(FORMATS["mp3"][0](stereo), max_duration=1.0)
    with pytest.raises(AudioTooLongError):
        load(np.zeros(32000, dtype=np.float32), rate=16000, max_duration=1.0)
    assert load(stereo, rate=RATE, max_duration=None).duration == pytest.approx(2.0, abs=1e-3)


def test_named_format_must_match_the_bytes(make_signal):
    wav = _soundfile_bytes(make_signal(0.3, 16000), 16000, "WAV", "PCM_16")
    assert len(load(wav, format="wav")) == 4800
    with pytest.raises(FormatMismatchError, match="mp3"):
        load(wav, format="mp3")
    with pytest.raises(FormatMismatchError, match="pcm16"):
        load(wav, format="pcm16", rate=16000)
    with pytest.raises(UnsupportedFormatError):
        load(wav, format="midi")


def test_pcm16_whose_first_bytes_look_like_a_frame_sync_is_still_pcm16():
    # A first sample of -1 is the bytes ff ff: an MPEG sync word, but not a container.
    samples = np.full(480, -1, dtype="<i2")
    assert sniff(samples.tobytes()) == "mp3"
    audio = load(samples.tobytes(), format="pcm16", rate=24000, sample_rate=24000)
    assert len(audio) == 480 and np.allclose(audio.samples, -1 / 32768)
    b64 = base64.b64encode(samples.tobytes()).decode()
    assert "/" in b64  # base64 with a slash is still base64 when the format is pcm16
    assert len(load(b64, format="pcm16", rate=24000, sample_rate=24000)) == 480


def test_many_channels_are_mixed_to_mono(make_signal):
    six = make_signal(0.5, 16000, channels=6)  # 5.1
    data = _soundfile_bytes(six, 16000, "WAV", "PCM_24")
    assert decode_bytes(data).channels == 6
    assert np.abs(load(data).samples - six.mean(axis=1)).max() < 1e-4


def _adts(samples: np.ndarray, rate: int) -> bytes:
    return _ffmpeg_bytes(samples, rate, "adts", "aac", rate)


def test_a_stream_that_changes_rate_or_channels_midway_keeps_its_length(make_signal):
    mono, stereo = make_signal(1.0, 44100), make_signal(1.0, 44100, channels=2)
    audio = load(_adts(mono, 44100) + _adts(stereo, 44100))
    assert audio.duration == pytest.approx(2.0, abs=0.1)
    halves = load(_adts(mono, 44100) + _adts(make_signal(1.0, 22050), 22050))
    assert halves.duration == pytest.approx(2.0, abs=0.1)  # not 1.5 s played at the wrong rate


def test_broken_metadata_and_damaged_packets_do_not_lose_the_audio(make_signal):
    mp3 = _ffmpeg_bytes(make_signal(2.0, 16000), 16000, "mp3", "libmp3lame", 16000)
    tag = mp3.index(b"Lavf")
    bad_tag = mp3[: tag + 4] + b"\x93" + mp3[tag + 5 :]  # not UTF-8 in a UTF-8 text frame
    assert load(bad_tag).duration == pytest.approx(2.0, abs=0.1)

    middle = len(mp3) // 2
    damaged = mp3[:middle] + np.random.default_rng(0).bytes(400) + mp3[middle:]
    assert load(damaged).duration == pytest.approx(2.0, abs=0.2)
    joined = load(mp3 + mp3)  # the second file's ID3 tag sits in the middle
    assert joined.duration == pytest.approx(4.0, abs=0.2)


def test_streams_written_without_a_length_are_read_to_the_end(make_signal):
    mono = make_signal(1.0, 16000)
    flac = bytearray(_soundfile_bytes(mono, 16000, "FLAC", "PCM_16"))
    # STREAMINFO's 36-bit total-sample count (file bytes 21-25, low nibble of byte 21 on) = 0.
    flac[21] &= 0xF0
    flac[22:26] = b"\x00\x00\x00\x00"
    assert len(load(bytes(flac))) == 16000
    with pytest.raises(AudioTooLongError, match="decoding stopped at 0.[5-9]"):  # not at the end
        load(bytes(flac), max_duration=0.5)

    wav = bytearray(_soundfile_bytes(mono, 16000, "WAV", "PCM_16"))
    data_chunk = wav.index(b"data")
    wav[data_chunk + 4 : data_chunk + 8] = b"\x00\x00\x00\x00"  # as a streaming writer leaves it
    assert len(load(bytes(wav))) == 16000


def test_unsigned_and_signed_integer_arrays_centre_on_silence():
    for dtype, middle in ((np.uint8, 128), (np.uint16, 32768), (np.uint32, 2**31)):
        assert np.abs(load(np.full(1000, middle, dtype), rate=16000).samples).max() == 0.0
    assert load(np.full(1000, -(2**15), np.int16), rate=16000).samples.min() == -1.0


@pytest.mark.parametrize("kwargs", [{"rate": 0}, {"rate": -8000}, {"sample_rate": 0}])
def test_bad_rates_are_audio_errors(kwargs):
    with pytest.raises(AudioError, match="rate"):
        load(np.zeros(100, np.float32), **({"rate": 16000} | kwargs))
    with pytest.raises(AudioError, match="rate"):
        load(b"\x00\x00" * 100, format="pcm16", **({"rate": 16000} | kwargs))


def test_strings_are_paths_data_urls_or_lenient_base64(tmp_path, make_signal):
    data = _soundfile_bytes(make_signal(0.25, 16000), 16000, "WAV", "PCM_16")
    expected = load(data).samples
    standard = base64.b64encode(data).decode()
    for text in (
        standard.rstrip("="),  # padding left off
        base64.urlsafe_b64encode(data).decode(),  # URL-safe alphabet
        base64.encodebytes(data).decode(),  # MIME line breaks
        "DATA:audio/wav;BASE64," + standard,
    ):
        assert np.array_equal(load(text).samples, expected)
    with pytest.raises(UndecodableAudioError, match="base64"):
        load("data:audio/wav;base64,!!!!")
    with pytest.raises(UndecodableAudioError, match="base64"):
        load("data:audio/wav," + standard)
    for missing in ("/tmp/nothere", "clip.wav", str(tmp_path / "x" / "y.mp3")):
        with pytest.raises(AudioFileNotFoundError):
            load(missing)
    with pytest.raises(AudioError, match="cannot read"):
        load(tmp_path / ("a" * 300))  # name too long: an AudioError, not a bare OSError


def test_adts_behind_an_id3_tag_is_still_aac(make_signal):
    adts = _adts(make_signal(1.0, 44100), 44100)
    tagged = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10 + adts  # a 10-byte empty tag body
    assert sniff(tagged) == "aac"
    # The 1024-sample priming is trimmed as for bare ADTS.
    assert abs(len(load(tagged, sample_rate=44100)) - 44100) < 1024
