"""The audio layer: bytes in (`load`), bytes out (`encode`), features (`log_mel`), voices.

`log_mel` and `log_mel_batch` live in `voxtune.audio.features` and are imported on first use,
so that commands which only move audio around do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from voxtune.audio.audio import Audio, resample
from voxtune.audio.decode import DEFAULT_MAX_DURATION, decode_bytes, load
from voxtune.audio.encode import CONTENT_TYPES, OUTPUT_FORMATS, encode
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
from voxtune.audio.info import AudioInfo, describe
from voxtune.audio.sniff import sniff

if TYPE_CHECKING:
    from voxtune.audio.features import log_mel, log_mel_batch

_LAZY = {"log_mel", "log_mel_batch"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from voxtune.audio import features

        return getattr(features, name)
    raise AttributeError(f"module 'voxtune.audio' has no attribute {name!r}")


__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_DURATION",
    "OUTPUT_FORMATS",
    "Audio",
    "AudioError",
    "AudioFileNotFoundError",
    "AudioInfo",
    "AudioTooLongError",
    "EmptyAudioError",
    "FormatMismatchError",
    "NonFiniteAudioError",
    "UndecodableAudioError",
    "UnsupportedFormatError",
    "ZeroLengthAudioError",
    "decode_bytes",
    "describe",
    "encode",
    "load",
    "log_mel",
    "log_mel_batch",
    "resample",
    "sniff",
]
