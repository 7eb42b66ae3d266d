"""What is in an audio file: format, rate, channels, duration and levels (`voxtune info`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from voxtune.audio.decode import decode_bytes, read_source

SILENCE_DBFS = -60.0  # RMS at or below this is silence
CLIP_LEVEL = 0.999  # |sample| at or above this counts as full scale
CLIP_RUN = 3  # this many full-scale samples in a row mean the signal was clipped


@dataclass(frozen=True)
class AudioInfo:
    """A description of one audio file; levels are in dBFS (0 = full scale)."""

    path: str
    container: str
    codec: str
    sample_rate: int
    channels: int
    duration: float
    peak_dbfs: float
    rms_dbfs: float
    silent: bool
    clipped: bool
    non_finite: bool

    def to_dict(self) -> dict:
        """JSON-ready dict (infinite levels of digital silence become None)."""
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def describe(path: str | os.PathLike, *, max_duration: float | None = None) -> AudioInfo:
    """Decode the file at `path` (format found from its bytes) and measure it.

    Levels are measured over the finite samples; `non_finite` says whether there were others
    (NaN or infinity, possible in float WAV). Any length is accepted unless `max_duration` says.

    Raises:
        AudioError: the file is missing, empty, not audio, or too long.
    """
    decoded = decode_bytes(read_source(Path(path)), max_duration=max_duration)
    samples = decoded.samples  # [channels, frames]
    finite = np.isfinite(samples)
    non_finite = not finite.all()
    if non_finite:
        samples = np.where(finite, samples, 0.0)
    magnitude = np.abs(samples)
    peak = float(magnitude.max()) if samples.size else 0.0
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    rms_dbfs = _dbfs(rms)
    return AudioInfo(
        path=str(path),
        container=decoded.container,
        codec=decoded.codec,
        sample_rate=decoded.sample_rate,
        channels=decoded.channels,
        duration=samples.shape[1] / decoded.sample_rate,
        peak_dbfs=_dbfs(peak),
        rms_dbfs=rms_dbfs,
        silent=rms_dbfs <= SILENCE_DBFS,
        clipped=peak > 1.0 or _longest_run(magnitude >= CLIP_LEVEL) >= CLIP_RUN,
        non_finite=non_finite,
    )


def _dbfs(level: float) -> float:
    return 20.0 * float(np.log10(level)) if level > 0 else float("-inf")


def _longest_run(flags: np.ndarray) -> int:
    """Longest run of True along the last axis, over all rows."""
    longest = 0
    for row in flags:
        padded = np.concatenate([[0], row.astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(padded))
        if edges.size:
            longest = max(longest, int((edges[1::2] - edges[::2]).max()))
    return longest
