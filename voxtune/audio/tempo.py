"""Tempo change without a pitch change (FFmpeg's `atempo` filter, through PyAV)."""

from __future__ import annotations

import math

import av
import av.filter
import numpy as np

from voxtune.audio.audio import Audio

# One atempo instance takes factors in [0.5, 2]; larger changes chain several.
_MIN_STEP, _MAX_STEP = 0.5, 2.0


def change_tempo(audio: Audio, factor: float) -> Audio:
    """Play `audio` `factor` times faster (factor < 1 slows it down), keeping its pitch."""
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"tempo factor must be a positive finite number, got {factor}")
    if factor == 1.0 or len(audio) == 0:
        return audio
    steps = []
    while factor < _MIN_STEP:
        steps.append(_MIN_STEP)
        factor /= _MIN_STEP
    while factor > _MAX_STEP:
        steps.append(_MAX_STEP)
        factor /= _MAX_STEP
    steps.append(factor)

    graph = av.filter.Graph()
    node = graph.add_abuffer(format="flt", sample_rate=audio.sample_rate, layout="mono")
    for step in steps:
        tempo = graph.add("atempo", f"{step:.6f}")
        node.link_to(tempo)
        node = tempo
    sink = graph.add("abuffersink")
    node.link_to(sink)
    graph.configure()

    frame = av.AudioFrame.from_ndarray(audio.samples[None, :], format="flt", layout="mono")
    frame.sample_rate = audio.sample_rate
    frame.pts = 0
    graph.push(frame)
    graph.push(None)
    pieces = []
    while True:
        try:
            pieces.append(graph.pull().to_ndarray().reshape(-1))
        except (av.error.EOFError, av.error.BlockingIOError):
            break
    samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return Audio(samples.astype(np.float32, copy=False), audio.sample_rate)
