"""Errors raised for audio that cannot be used, one subclass per cause.

Every message names the problem in one line, so the CLI can print it and the server can return
it as a 4xx without rewording.
"""

from voxtune.errors import InputError


class AudioError(InputError):
    """Base class: the audio given cannot be used."""


class EmptyAudioError(AudioError):
    """No data at all (zero bytes, an empty string, an empty array)."""


class UndecodableAudioError(AudioError):
    """The bytes are not audio in any format voxtune reads, or are broken."""


class ZeroLengthAudioError(AudioError):
    """The data decodes, but holds no samples."""


class NonFiniteAudioError(AudioError):
    """Samples include NaN or infinity."""


class AudioTooLongError(AudioError):
    """The audio is longer than the allowed maximum duration."""


class FormatMismatchError(AudioError):
    """The caller named a format, but the bytes are another one."""


class UnsupportedFormatError(AudioError):
    """A format name voxtune does not know (for reading or writing)."""


class AudioFileNotFoundError(AudioError, FileNotFoundError):
    """A path was given and nothing is there."""
