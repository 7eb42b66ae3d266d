"""Speech spans: pauses split a clip, silence has none, the times are where the speech is."""

from __future__ import annotations

import numpy as np

from voxtune.audio import Audio, voices
from voxtune.audio.spans import speech_spans


def test_a_pause_splits_two_utterances_at_the_right_times():
    one = voices.synthesize("Good morning.", "en").resample(16000).samples
    gap = np.zeros(16000, np.float32)
    audio = Audio(np.concatenate([gap[:8000], one, gap, 0.2 * one]), 16000)  # the second one quieter
    spans = speech_spans(audio)
    first_end = (8000 + len(one)) / 16000
    assert len(spans) == 2
    assert spans[0][0] < 0.5 + 0.15 and abs(spans[0][1] - first_end) < 0.25
    assert abs(spans[1][0] - (first_end + 1.0)) < 0.25 and spans[1][1] <= audio.duration


def test_silence_and_near_silence_have_no_speech():
    assert speech_spans(Audio(np.zeros(16000, np.float32), 16000)) == []
    assert speech_spans(Audio(np.full(16000, 1e-5, np.float32), 16000)) == []


def test_long_speech_is_cut_into_spans_no_longer_than_asked():
    one = voices.synthesize("This sentence keeps going and going without a real pause in it at all.", "en").resample(
        16000
    )
    spans = speech_spans(one, max_span=1.5)
    assert len(spans) >= 2 and all(end - start <= 1.5 + 0.25 for start, end in spans)
