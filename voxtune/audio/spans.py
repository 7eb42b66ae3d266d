"""Where the speech is: a clip split at its pauses into spans of speech, with their times.

Energy-based: a 20 ms frame is speech when its RMS is within `range_db` of the clip's loudest
frames (so the threshold follows the recording level) and above an absolute floor. Pauses
at least `min_pause` long split spans; spans longer than `max_span` are cut at their quietest
frame. Transcription uses the spans as segments with real start and end times.
"""

from __future__ import annotations

import numpy as np

from voxtune.audio.audio import Audio

FRAME_SECONDS = 0.02


def speech_spans(
    audio: Audio,
    *,
    min_pause: float = 0.3,
    max_span: float = 20.0,
    range_db: float = 35.0,
    floor_db: float = -60.0,
    pad: float = 0.1,
) -> list[tuple[float, float]]:
    """(start, end) seconds of each stretch of speech in `audio`, in order; [] for silence."""
    hop = max(1, int(round(FRAME_SECONDS * audio.sample_rate)))
    count = len(audio) // hop
    if count == 0:
        return []
    frames = audio.samples[: count * hop].reshape(count, hop).astype(np.float64)  # [T, hop]
    level = 10 * np.log10(np.maximum((frames**2).mean(1), 1e-12))  # [T] dBFS
    loud = np.percentile(level, 95)
    voiced = level > max(loud - range_db, floor_db)
    spans = _runs(voiced, min_gap=int(round(min_pause / FRAME_SECONDS)))
    spans = [piece for span in spans for piece in _cut(span, level, int(max_span / FRAME_SECONDS))]
    pad_frames = int(round(pad / FRAME_SECONDS))
    seconds = hop / audio.sample_rate  # per frame
    return [
        (max(0, start - pad_frames) * seconds, min(audio.duration, (end + pad_frames) * seconds))
        for start, end in spans
    ]


def _runs(voiced: np.ndarray, min_gap: int) -> list[tuple[int, int]]:
    """Frame ranges [start, end) of voiced runs, joined across gaps shorter than `min_gap`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], voiced.astype(np.int8), [0]])))
    runs = list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=False))
    joined: list[tuple[int, int]] = []
    for start, end in runs:
        if joined and start - joined[-1][1] < min_gap:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return [(s, e) for s, e in joined if e - s >= 3]  # under 60 ms is a click, not speech


def _cut(span: tuple[int, int], level: np.ndarray, longest: int) -> list[tuple[int, int]]:
    """Split a span longer than `longest` frames at its quietest frame in the middle half."""
    start, end = span
    if end - start <= longest:
        return [span]
    quarter = (end - start) // 4
    middle = start + quarter + int(np.argmin(level[start + quarter : end - quarter]))
    return _cut((start, middle), level, longest) + _cut((middle, end), level, longest)
