"""Audio from a file that need not be held in memory: its length and a digest of its samples
are kept, and the samples are decoded again from the file when they are read.

A training run reads each clip once per epoch. When the encoder's outputs come from a cache,
later epochs need only each clip's length (its audio token count) and a digest of its samples
(its cache key): decoding and hashing the audio again cost about 4% of an epoch in
`benchmarks/train_throughput.py`. `SpeechDataset` hands out `FileAudio` for files it has read
before with the same size and modification time.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from voxtune.audio.audio import Audio
from voxtune.audio.decode import load
from voxtune.audio.errors import AudioError


def samples_digest(samples: np.ndarray) -> str:
    """sha256 of 1-D samples (their dtype, length and bytes), as 64 hex characters."""
    samples = np.ascontiguousarray(samples)
    digest = hashlib.sha256(f"{samples.dtype.str}:{samples.shape}:".encode())
    digest.update(samples.data.cast("B"))
    return digest.hexdigest()


class FileAudio(Audio):
    """`Audio` decoded from `path` by `voxtune.audio.load` at `sample_rate`, with its length and
    `digest` (`samples_digest`) known. It may hold its samples (read-only) or not
    (`without_samples`); one that does not decodes the file again whenever `samples` is read,
    and raises `AudioError` if the file no longer gives the same samples. Made by `read` and
    `without_samples` only (not `dataclasses.replace`); comparing two decodes them."""

    path: str
    digest: str
    _length: int
    _samples: np.ndarray | None

    def __init__(
        self, path: str | os.PathLike, sample_rate: int, length: int, digest: str, samples: np.ndarray | None = None
    ) -> None:
        # Audio is a frozen dataclass: set what it holds directly, and not its samples field.
        object.__setattr__(self, "path", os.fspath(path))
        object.__setattr__(self, "sample_rate", int(sample_rate))
        object.__setattr__(self, "_length", int(length))
        object.__setattr__(self, "digest", digest)
        object.__setattr__(self, "_samples", samples)

    @classmethod
    def read(cls, path: str | os.PathLike, sample_rate: int) -> FileAudio:
        """Decode `path` now (as `load(path, sample_rate)`), keeping the samples."""
        samples = load(path, sample_rate).samples
        samples.flags.writeable = False  # its digest must stay true
        return cls(path, sample_rate, len(samples), samples_digest(samples), samples)

    def without_samples(self) -> FileAudio:
        """The same audio, its samples let go (decoded again when read)."""
        return FileAudio(self.path, self.sample_rate, self._length, self.digest)

    @property
    def holds_samples(self) -> bool:
        """Whether the samples are in memory (else reading them decodes the file)."""
        return self._samples is not None

    @property  # Audio's field, read-only here
    def samples(self) -> np.ndarray:
        """The samples: held, or decoded from the file again (AudioError if it changed)."""
        if self._samples is not None:
            return self._samples
        samples = load(self.path, self.sample_rate).samples
        if len(samples) != self._length or samples_digest(samples) != self.digest:
            raise AudioError(f"{self.path} changed while it was in use: it no longer decodes to the same audio")
        return samples

    def __len__(self) -> int:
        return self._length

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self._length / self.sample_rate

    def __repr__(self) -> str:
        held = "held" if self.holds_samples else "on file"
        return f"FileAudio({self.path!r}, {self.sample_rate} Hz, {self._length} samples, {held})"
