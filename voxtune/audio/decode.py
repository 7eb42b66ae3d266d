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
from voxtune.audio.sniff import container_magic, sniff
from voxtune.errors import echo

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
# libsndfile reports streams written without a length (FFmpeg piping FLAC, a WAV with a zero
# data size) as 0 or about 2**63 frames; those go to FFmpeg, which reads to the end.
_UNKNOWN_LENGTH = 1 << 62
# FFmpeg demuxer per sniffed format: named rather than probed, since probing needs several
# frames to be sure of raw MP3 or ADTS and gives up on very short clips.
_DEMUXERS = {
    "wav": "wav",
    "flac": "flac",
    "ogg": "ogg",
    "opus": "ogg",
    "webm": "matroska",
    "mp4": "mov",
    "mp3": "mp3",
    "aac": "aac",
    "aiff": "aiff",
    "caf": "caf",
}
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
        """Number of channels."""
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
        source: what to load. A `str` is a path when such a file exists, else base64 (standard
            or URL-safe alphabet, padding optional) or a `data:...;base64,` URL.
            A 2-D array is (frames, channels), or (channels, frames) when it is wider than tall.
        sample_rate: rate of the returned audio (resampled with soxr if needed).
        format: the format the caller says the bytes are in; checked against the bytes.
            "pcm16" (headerless 16-bit little-endian mono) needs `rate`.
        rate: the rate of an array source or of pcm16 bytes.
        max_duration: longest accepted audio in seconds, checked before full decoding where
            the container says its length, and again while decoding; None accepts any length.

    Returns:
        Mono float32 `Audio` in [-1, 1] at `sample_rate`.

    Raises:
        AudioError: a subclass naming the cause (empty, undecodable, zero length, non-finite,
            too long, format mismatch, unknown format, missing file).
    """
    _check_rate(sample_rate, "sample_rate")
    if isinstance(source, Audio):
        decoded = Decoded(source.samples[None, :], source.sample_rate, "array", "float32")
    elif isinstance(source, np.ndarray):
        decoded = _from_array(source, rate)
    else:
        data = read_source(source, format=format)
        decoded = decode_bytes(data, format=format, rate=rate, max_duration=max_duration)
    return _finish(decoded, sample_rate, max_duration)


def decode_bytes(
    data: bytes,
    *,
    format: str | None = None,
    rate: int | None = None,
    max_duration: float | None = DEFAULT_MAX_DURATION,
) -> Decoded:
    """Decode encoded audio bytes into their native channels and rate; the format is found from
    the bytes, and `format`, when given, must agree with them.

    Raises:
        AudioError: as `load`.
    """
    if not data:
        raise EmptyAudioError("no audio data (0 bytes)")
    if format is not None:
        format = format.lower()
        if format not in NAMED_FORMATS:
            known = ", ".join(sorted(NAMED_FORMATS))
            raise UnsupportedFormatError(f"unknown audio format {echo(format)} (known: {known})")
        if format in ("pcm16", "pcm"):
            if (container := container_magic(data)) is not None:
                raise FormatMismatchError(f"format is pcm16 but the data is a {container} file")
            return _decode_pcm16(data, rate, max_duration)
    sniffed = sniff(data)
    if format is not None and sniffed is not None and sniffed not in NAMED_FORMATS[format]:
        raise FormatMismatchError(f"format is {format} but the data is {sniffed}")
    if sniffed is None:
        raise UndecodableAudioError(
            f"unrecognised audio data ({len(data)} bytes, starting {data[:8].hex()}); "
            "headerless PCM needs format='pcm16' and its rate"
        )
    if sniffed in _SOUNDFILE_FORMATS:
        try:
            decoded = _decode_soundfile(data, max_duration)
        except sf.LibsndfileError:
            decoded = None  # a codec libsndfile lacks inside a known container: FFmpeg reads more
        if decoded is not None:
            return decoded
    return _decode_av(data, sniffed, max_duration)


def read_source(source: str | bytes | os.PathLike, *, format: str | None = None) -> bytes:
    """The encoded bytes behind a path, bytes, a base64 string or a base64 data URL."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, os.PathLike):
        return _read_file(Path(source))
    if not isinstance(source, str):
        raise TypeError(f"cannot load audio from {type(source).__name__}")
    text = source.strip()
    if not text:
        raise EmptyAudioError("no audio data (empty string)")
    if text[:5].lower() == "data:":
        header, comma, payload = text.partition(",")
        if not comma or ";base64" not in header.lower():
            raise UndecodableAudioError("a data URL must hold base64 audio (data:audio/...;base64,...)")
        if (data := _base64(payload)) is None:
            raise UndecodableAudioError("the data URL's base64 is invalid")
        return data
    if len(text) < 4096 and os.path.isfile(text):
        return _read_file(Path(text))
    data = _base64(text)
    # Base64 never holds "." or a backslash; it may start with "/" (MP3 frames encode as "//"), so
    # what decodes to audio, or is declared pcm16, wins over a path that is not there.
    looks_like_path = len(text) < 4096 and ("." in text or "\\" in text or text[0] in "/~")
    if data is not None and (format in ("pcm16", "pcm") or sniff(data) or not looks_like_path):
        return data
    if looks_like_path:
        return _read_file(Path(text))  # says what is wrong: missing, a directory, unreadable
    raise UndecodableAudioError("the string is neither an existing file nor base64 audio")


def _base64(text: str) -> bytes | None:
    """Decode standard or URL-safe base64, with or without padding and line breaks; None if invalid."""
    compact = "".join(text.split()).replace("-", "+").replace("_", "/").rstrip("=")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise AudioFileNotFoundError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UndecodableAudioError(f"{path} is a directory, not an audio file") from None
    except OSError as error:
        raise AudioError(f"cannot read {path}: {error.strerror or error}") from None


def _check_rate(rate: int, name: str) -> None:
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"{name} must be a positive whole number of Hz, got {echo(rate)}")


def _from_array(array: np.ndarray, rate: int | None) -> Decoded:
    if rate is None:
        raise AudioError("an array source needs its sample rate (rate=...)")
    _check_rate(rate, "rate")
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
    if np.issubdtype(array.dtype, np.unsignedinteger):  # silence is the middle of the range
        half = float(np.iinfo(array.dtype).max // 2 + 1)
        return ((array.astype(np.float64) - half) / half).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return (array / float(np.iinfo(array.dtype).max + 1)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise AudioError(f"unsupported sample type {array.dtype}")


def _decode_pcm16(data: bytes, rate: int | None, max_duration: float | None) -> Decoded:
    if rate is None:
        raise AudioError("pcm16 data needs its sample rate (rate=...)")
    _check_rate(rate, "rate")
    if len(data) % 2:
        raise UndecodableAudioError(f"pcm16 data must be whole 16-bit samples, got {len(data)} bytes")
    _check_duration(len(data) // 2 / rate, max_duration)
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return Decoded(samples[None, :], rate, "raw", "pcm_s16le")


def _decode_soundfile(data: bytes, max_duration: float | None) -> Decoded | None:
    """Decode through libsndfile; None when the stream does not say how long it is."""
    with sf.SoundFile(io.BytesIO(data)) as f:
        if not 0 < f.frames < _UNKNOWN_LENGTH:
            return None
        _check_duration(f.frames / f.samplerate, max_duration)
        samples = f.read(dtype="float32", always_2d=True)  # [frames, channels]
        return Decoded(np.ascontiguousarray(samples.T), f.samplerate, f.format.lower(), f.subtype.lower())


def _decode_av(data: bytes, kind: str, max_duration: float | None) -> Decoded:
    """Decode through FFmpeg, packet by packet: a damaged packet is skipped, as players do."""
    try:
        demuxer = _DEMUXERS.get(kind)
        with av.open(io.BytesIO(data), mode="r", format=demuxer, metadata_errors="replace") as container:
            if not container.streams.audio:
                raise UndecodableAudioError(f"the {kind} data holds no audio stream")
            stream = container.streams.audio[0]
            if container.duration is not None:  # microseconds, from the header
                _check_duration(container.duration / 1_000_000, max_duration)
            chunks, skipped = _decode_packets(container, stream, kind, max_duration)
            codec, profile = stream.codec_context.name, stream.codec_context.profile
    except av.error.FFmpegError as error:
        raise UndecodableAudioError(f"cannot decode {kind} audio: {error}") from None
    if not chunks:
        detail = f" ({skipped} damaged packets)" if skipped else ""
        raise ZeroLengthAudioError(f"the {kind} data decodes to no samples{detail}")
    rate = chunks[0][1]
    samples = np.concatenate([c for c, _ in chunks], axis=1).astype(np.float32, copy=False)
    if kind == "aac" and profile == "LC":
        samples = samples[:, _ADTS_LC_PRIMING:]
    return Decoded(samples, rate, "ogg" if kind == "opus" else kind, codec)


def _decode_packets(container, stream, kind: str, max_duration: float | None) -> tuple[list, int]:
    """([(samples [channels, n], rate)], damaged packet count). Every frame is converted to the
    first frame's rate and channel layout, since a stream may change them midway."""
    chunks: list[tuple[np.ndarray, int]] = []
    resampler: av.AudioResampler | None = None
    key: tuple[str, str, int] | None = None  # (format, layout, rate) the resampler was set up for
    target: tuple[str, int] | None = None  # (layout, rate) of the first frame
    total, skipped = 0, 0

    def drain(frames, rate: int) -> None:
        nonlocal total
        for out in frames:
            chunks.append((out.to_ndarray(), rate))  # [channels, n]
            total += out.samples

    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            skipped += 1
            continue
        for frame in frames:
            if target is None:
                target = (frame.layout.name, frame.sample_rate)
            if resampler is None or (frame.format.name, frame.layout.name, frame.sample_rate) != key:
                if resampler is not None:
                    drain(resampler.resample(None), target[1])  # what the old set-up still holds
                key = (frame.format.name, frame.layout.name, frame.sample_rate)
                resampler = av.AudioResampler(format="fltp", layout=target[0], rate=target[1])
            drain(resampler.resample(frame), target[1])
            # Headers can lie about length (or not give it): stop decoding at the limit.
            if max_duration is not None and total / target[1] > max_duration:
                raise AudioTooLongError(
                    f"audio runs past the {max_duration:g} s limit (decoding stopped at {total / target[1]:.1f} s)"
                )
    if resampler is not None and target is not None:  # both set by the first frame
        drain(resampler.resample(None), target[1])
    return chunks, skipped


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
