"""`Audio` out to bytes: wav, flac, mp3, opus (in Ogg), aac (ADTS) and raw pcm16."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Literal, NamedTuple

import av
import numpy as np
import soundfile as sf

from voxtune.audio.audio import Audio
from voxtune.audio.errors import (
    EmptyAudioError,
    NonFiniteAudioError,
    UnsupportedFormatError,
)
from voxtune.errors import echo

if TYPE_CHECKING:
    from av.audio.stream import AudioStream
    from av.container import OutputContainer

OUTPUT_FORMATS = ("wav", "mp3", "flac", "opus", "aac", "pcm16")
# "pcm" is the /v1/audio/speech name for what chat completions calls "pcm16".
FORMAT_ALIASES = {"pcm": "pcm16"}
CONTENT_TYPES = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "pcm16": "audio/pcm",
}
PCM16_RATE = 24000  # the OpenAI convention for headerless PCM
# Codecs emit whole frames and may emit none for a few samples: shorter audio is padded with
# silence to this length first (longer than one frame of mp3, aac or opus at any rate).
_MIN_CODEC_SECONDS = 0.03

# (container, encoder, rates the encoder takes, bit rate) for the formats FFmpeg writes.
_Codec = Literal["libmp3lame", "libopus", "aac", "pcm_s16le"]
_AV_CODECS: dict[str, tuple[str, _Codec, tuple[int, ...], int]] = {
    "mp3": ("mp3", "libmp3lame", (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000), 64_000),
    "opus": ("ogg", "libopus", (8000, 12000, 16000, 24000, 48000), 48_000),
    "aac": ("adts", "aac", (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000), 64_000),
}


def normalize_format(format: str) -> str:
    """Return the canonical output format name, or raise `UnsupportedFormatError`."""
    name = FORMAT_ALIASES.get(format.lower(), format.lower())
    if name not in OUTPUT_FORMATS:
        raise UnsupportedFormatError(f"cannot write audio as {echo(format)} (choose from {', '.join(OUTPUT_FORMATS)})")
    return name


def encode(audio: Audio, format: str, sample_rate: int | None = None) -> bytes:
    """Encode mono `audio` as `format` ("wav", "mp3", "flac", "opus", "aac", "pcm16"/"pcm").

    Args:
        audio: what to encode.
        format: output format. pcm16 is headerless 16-bit little-endian mono.
        sample_rate: output rate. By default the audio's own rate, except pcm16 (24 kHz) and
            codecs that cannot take that rate (the nearest higher rate they take).

    Returns:
        The encoded bytes, a complete file for every format but pcm16.
    """
    format = normalize_format(format)
    if len(audio) == 0:
        raise EmptyAudioError("cannot encode empty audio")
    if not np.isfinite(audio.samples).all():
        raise NonFiniteAudioError("cannot encode audio with NaN or infinite samples")
    if format == "pcm16":
        return _to_int16(audio.resample(sample_rate or PCM16_RATE).samples).tobytes()
    if format in ("wav", "flac"):
        audio = audio.resample(sample_rate or audio.sample_rate)
        buffer = io.BytesIO()
        sf.write(buffer, audio.samples, audio.sample_rate, format=format.upper(), subtype="PCM_16")
        return buffer.getvalue()
    return _encode_av(audio, format, sample_rate)


# A wav stream goes through FFmpeg too: libsndfile needs to seek back to finish a file.
_STREAM_CODECS: dict[str, tuple[str, _Codec, tuple[int, ...] | None, int | None]] = {
    **_AV_CODECS,
    "wav": ("wav", "pcm_s16le", None, None),
}


class _Output(NamedTuple):
    """What a stream is encoded with, from its first piece on."""

    container: OutputContainer
    stream: AudioStream
    resampler: av.AudioResampler
    input_rate: int  # FFmpeg's resampler takes one input rate


class StreamEncoder:
    """Encode audio that arrives in pieces (a voice's sentences) as one stream of `format`.

    Each `feed` returns the bytes that are ready, `close` the rest; joined, they are one
    complete file (wav without its length, which a stream cannot know up front; mp3 without
    the header that lets decoders trim the encoder's priming, a few ms of silence; flac only at
    `close`). The rate is the first piece's (pcm16: 24 kHz), or the nearest a codec takes.
    """

    def __init__(self, format: str) -> None:
        self.format = normalize_format(format)
        self._chunks: list[bytes] = []
        self._output: _Output | None = None
        self._fed = False
        # FLAC goes out whole at the end: a streamed FLAC header cannot hold the length, and
        # libsndfile (soundfile, librosa) then refuses the file.
        self._held: list[Audio] = []

    def feed(self, audio: Audio) -> bytes:
        """Encode the next piece; returns the bytes ready now (maybe none)."""
        if not np.isfinite(audio.samples).all():
            raise NonFiniteAudioError("cannot encode audio with NaN or infinite samples")
        if len(audio) == 0:  # a sentence of punctuation alone renders to nothing
            return b""
        self._fed = True
        if self.format == "pcm16":
            return _to_int16(audio.resample(PCM16_RATE).samples).tobytes()
        if self.format == "flac":
            self._held.append(audio)
            return b""
        if self._output is None:
            self._output = self._open(audio.sample_rate)
        elif audio.sample_rate != self._output.input_rate:
            audio = audio.resample(self._output.input_rate)
        frame = av.AudioFrame.from_ndarray(audio.samples[None, :], format="flt", layout="mono")
        frame.sample_rate = audio.sample_rate
        frame.pts = None  # the resampler and encoder keep time
        output = self._output
        for converted in output.resampler.resample(frame):
            for packet in output.stream.encode(converted):
                output.container.mux(packet)
        return self._take()

    def close(self) -> bytes:
        """Flush the encoder; returns the last bytes."""
        if not self._fed and self.format != "pcm16":  # still a valid (silent) file
            self.feed(Audio(np.zeros(int(_MIN_CODEC_SECONDS * PCM16_RATE), np.float32), PCM16_RATE))
        if self.format == "flac" and self._held:
            held, self._held = self._held, []
            rate = held[0].sample_rate
            return encode(Audio(np.concatenate([a.resample(rate).samples for a in held]), rate), "flac")
        if self._output is None:
            return b""
        output = self._output
        for converted in output.resampler.resample(None):
            for packet in output.stream.encode(converted):
                output.container.mux(packet)
        for packet in output.stream.encode(None):
            output.container.mux(packet)
        output.container.close()
        self._output = None
        return self._take()

    def _open(self, rate: int) -> _Output:
        container_format, codec, rates, bit_rate = _STREAM_CODECS[self.format]
        input_rate = rate
        if rates is not None and rate not in rates:
            rate = next((r for r in rates if r >= rate), rates[-1])
        # Ogg pages of 100 ms instead of 1 s, so that every sentence leaves when it is encoded.
        options = {"page_duration": "100000"} if container_format == "ogg" else {}
        container = av.open(_Pipe(self._chunks), mode="w", format=container_format, options=options)
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        return _Output(container, stream, resampler, input_rate)

    def _take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


class _Pipe:
    """A write-only, unseekable file for FFmpeg: muxers then write a stream, never going back."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.position = 0

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        pass


def _to_int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")


def _encode_av(audio: Audio, format: str, sample_rate: int | None) -> bytes:
    container_format, codec, rates, bit_rate = _AV_CODECS[format]
    rate = sample_rate or audio.sample_rate
    if rate not in rates:
        rate = next((r for r in rates if r >= rate), rates[-1])
    if audio.duration < _MIN_CODEC_SECONDS:
        padding = np.zeros(int(np.ceil(_MIN_CODEC_SECONDS * audio.sample_rate)) - len(audio), np.float32)
        audio = Audio(np.concatenate([audio.samples, padding]), audio.sample_rate)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(audio.samples[None, :], format="flt", layout="mono")
        frame.sample_rate = audio.sample_rate
        # pts 0 lets the encoder stamp its priming as negative time, so muxers that can record
        # it (Ogg pre-skip, the LAME header) let decoders trim it.
        frame.pts = 0
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        for converted in resampler.resample(frame) + resampler.resample(None):
            container.mux(stream.encode(converted))
        container.mux(stream.encode(None))
    return buffer.getvalue()
