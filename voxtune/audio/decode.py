"""Bytes (or a path, base64, or an array) in; validated 16 kHz mono float32 `Audio` out.

Containers libsndfile reads (WAV in every PCM/float/G.711 flavour, FLAC, Ogg Vorbis, AIFF, CAF)
go through soundfile; the rest (MP3, Opus in Ogg or WebM, AAC in ADTS or MP4/M4A) through
FFmpeg via PyAV, whose decoders trim encoder delay and padding where the container records it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from voxtune.audio.audio import Audio, resample
from voxtune.audio.errors import (
    AudioError,
    AudioFileNotFoundError,
    AudioTooLongError,
    EmptyAudioError,
    FormatMismatchError,
    NonFiniteAudioError,
    UndecodableAudioError,
    UnsupportedFormatError,
    ZeroLengthAudioError,
)
from voxtune.audio.sniff import sniff

DEFAULT_SAMPLE_RATE = 16000
DEFAULT_MAX_DURATION = 3600.0  # seconds; None disables the check

# What each format a caller may name can actually be, as `sniff` reports it.
NAMED_FORMATS: dict[str, frozenset[str]] = {
    "wav": frozenset({"wav"}),
    "flac": frozenset({"flac"}),
    "mp3": frozenset({"mp3"}),
    "mpeg": frozenset({"mp3"}),
    "mpga": frozenset({"mp3"}),
    "ogg": frozenset({"ogg", "opus", "flac"}),
    "oga": frozenset({"ogg", "opus", "flac"}),
    "opus": frozenset({"opus", "webm"}),
    "webm": frozenset({"webm"}),
    "mp4": frozenset({"mp4"}),
    "m4a": frozenset({"mp4"}),
    "aac": frozenset({"aac", "mp4"}),
    "aiff": frozenset({"aiff"}),
    "pcm16": frozenset(),  # headerless: nothing to check but that it is not a known container
    "pcm": frozenset(),
}
_SOUNDFILE_FORMATS = frozenset({"wav", "flac", "ogg", "aiff", "caf"})
# ADTS has no field for encoder priming; FFmpeg's and FDK's AAC-LC encoders both prepend 1024.
_ADTS_LC_PRIMING = 1024


@dataclass(frozen=True)
class Decoded:
    """Audio as it was stored: `samples` is float32 `[channels, frames]` at the native rate."""

    samples: np.ndarray
    sample_rate: int
    container: str
    codec: str

    @property
    def channels(self) -> int:
        return self.samples.shape[0]


def load(
    source: str | bytes | os.PathLike | np.ndarray | Audio,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    *,
    format: str | None = None,
    rate: int | None = None,
    max_duration: float | None = DEFAULT_MAX_DURATION,
) -> Audio:
    """Load audio from a path, raw bytes, a base64 string (or data URL), an array or an `Audio`.

    Args:
        source: what to load. A `str` is a path when such a file exists, else base64.
            A 2-D array is (frames, channels), or (channels, frames) when it is wider than tall.
        sample_rate: rate of the returned audio (resampled with soxr if needed).
        format: the format the caller says the bytes are in; checked against the bytes.
            "pcm16" (headerless 16-bit little-endian mono) needs `rate`.
        rate: the rate of an array source or of pcm16 bytes.
        max_duration: longest accepted audio in seconds, checked before full decoding where
            the container says its length; None accepts any length.

    Returns:
        Mono float32 `Audio` in [-1, 1] at `sample_rate`.

    Raises:
        AudioError: a subclass naming the cause (empty, undecodable, zero length, non-finite,
            too long, format mismatch, unknown format, missing file).
    """
    if isinstance(source, Audio):
        decoded = Decoded(source.samples[None, :], source.sample_rate, "array", "float32")
    elif isinstance(source, np.ndarray):
        decoded = _from_array(source, rate)
    else:
        decoded = decode_bytes(read_source(source), format=format, rate=rate, max_duration=max_duration)
    return _finish(decoded, sample_rate, max_duration)


def decode_bytes(
    data: bytes,
    *,
    format: str | None = None,
    rate: int | None = None,
    max_duration: float | None = DEFAULT_MAX_DURATION,
) -> Decoded:
    """Decode encoded audio bytes into their native channels and rate, format found from the bytes."""
    if not data:
        raise EmptyAudioError("no audio data (0 bytes)")
    sniffed = sniff(data)
    if format is not None:
        format = format.lower()
        if format not in NAMED_FORMATS:
            known = ", ".join(sorted(NAMED_FORMATS))
            raise UnsupportedFormatError(f"unknown audio format {format!r} (known: {known})")
        if format in ("pcm16", "pcm"):
            if sniffed is not None:
                raise FormatMismatchError(f"format is pcm16 but the data is a {sniffed} file")
            return _decode_pcm16(data, rate, max_duration)
        if sniffed is not None and sniffed not in NAMED_FORMATS[format]:
            raise FormatMismatchError(f"format is {format} but the data is {sniffed}")
    if sniffed is None:
        raise UndecodableAudioError(
            f"unrecognised audio data ({len(data)} bytes, starting {data[:8].hex()}); "
            "headerless PCM needs format='pcm16' and its rate"
        )
    if sniffed in _SOUNDFILE_FORMATS:
        try:
            return _decode_soundfile(data, max_duration)
        except sf.LibsndfileError:
            pass  # a codec libsndfile lacks inside a known container: FFmpeg reads more
    return _decode_av(data, sniffed, max_duration)


def read_source(source: str | bytes | os.PathLike) -> bytes:
    """The encoded bytes behind a path, bytes, base64 string or base64 data URL."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, os.PathLike):
        return _read_file(Path(source))
    if not isinstance(source, str):
        raise TypeError(f"cannot load audio from {type(source).__name__}")
    text = source.strip()
    if not text:
        raise EmptyAudioError("no audio data (empty string)")
    if len(text) < 4096 and os.path.isfile(text):
        return _read_file(Path(text))
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise UndecodableAudioError("data URL is not base64-encoded")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        if len(text) < 4096:
            raise AudioFileNotFoundError(f"no such file: {text}") from None
        raise UndecodableAudioError("string is neither a file path nor valid base64") from None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise AudioFileNotFoundError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UndecodableAudioError(f"{path} is a directory, not an audio file") from None
    except PermissionError:
        raise AudioError(f"cannot read {path}: permission denied") from None


def _from_array(array: np.ndarray, rate: int | None) -> Decoded:
    if rate is None:
        raise AudioError("an array source needs its sample rate (rate=...)")
    if array.size == 0:
        raise EmptyAudioError("no audio data (empty array)")
    if array.ndim == 1:
        array = array[None, :]
    elif array.ndim == 2:
        # soundfile's convention is (frames, channels); a wider-than-tall array is channels-first.
        array = array if array.shape[1] > array.shape[0] else array.T
    else:
        raise AudioError(f"audio array must be 1-D or 2-D, got shape {array.shape}")
    return Decoded(_to_float32(array), int(rate), "array", str(array.dtype))


def _to_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(array.dtype, np.integer):
        return (array / float(np.iinfo(array.dtype).max + 1)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise AudioError(f"unsupported sample type {array.dtype}")


def _decode_pcm16(data: bytes, rate: int | None, max_duration: float | None) -> Decoded:
    if rate is None:
        raise AudioError("pcm16 data needs its sample rate (rate=...)")
    if len(data) % 2:
        raise UndecodableAudioError(f"pcm16 data must be whole 16-bit samples, got {len(data)} bytes")
    _check_duration(len(data) // 2 / rate, max_duration)
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return Decoded(samples[None, :], rate, "raw", "pcm_s16le")


def _decode_soundfile(data: bytes, max_duration: float | None) -> Decoded:
    with sf.SoundFile(io.BytesIO(data)) as f:
        _check_duration(f.frames / f.samplerate, max_duration)
        samples = f.read(dtype="float32", always_2d=True)  # [frames, channels]
        return Decoded(np.ascontiguousarray(samples.T), f.samplerate, f.format.lower(), f.subtype.lower())


def _decode_av(data: bytes, kind: str, max_duration: float | None) -> Decoded:
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise UndecodableAudioError(f"the {kind} data holds no audio stream")
            stream = container.streams.audio[0]
            if container.duration is not None:  # microseconds, from the header
                _check_duration(container.duration / 1_000_000, max_duration)
            chunks, rate, total = [], None, 0
            resampler = None
            for frame in container.decode(stream):
                if resampler is None:
                    rate = frame.sample_rate
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())  # [channels, n]
                    total += out.samples
                # Headers can lie about length: enforce the limit while decoding too.
                _check_duration(total / rate, max_duration)
            codec = stream.codec_context.name
            profile = stream.codec_context.profile
            container_name = container.format.name
    except av.error.FFmpegError as error:
        raise UndecodableAudioError(f"cannot decode {kind} audio: {error}") from None
    if not chunks:
        raise ZeroLengthAudioError(f"the {kind} data decodes to no samples")
    samples = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    if kind == "aac" and profile == "LC":
        samples = samples[:, _ADTS_LC_PRIMING:]
    return Decoded(samples, rate, container_name.split(",")[0], codec)


def _check_duration(seconds: float, max_duration: float | None) -> None:
    if max_duration is not None and seconds > max_duration:
        raise AudioTooLongError(f"audio is {seconds:.1f} s long, over the {max_duration:g} s limit")


def _finish(decoded: Decoded, sample_rate: int, max_duration: float | None) -> Audio:
    samples = decoded.samples
    if samples.shape[1] == 0:
        raise ZeroLengthAudioError("audio has no samples")
    if not np.isfinite(samples).all():
        raise NonFiniteAudioError("audio contains NaN or infinite samples")
    _check_duration(samples.shape[1] / decoded.sample_rate, max_duration)
    mono = samples.mean(axis=0) if decoded.channels > 1 else samples[0]
    mono = np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)
    return Audio(resample(mono, decoded.sample_rate, sample_rate), sample_rate)
