"""The natural English voice is understood by a real recogniser (Whisper tiny.en, converted
from the wheel), far better than eSpeak NG's voice for the same name."""

from __future__ import annotations

import voxtune
from voxtune.audio.voices import EspeakBackend, PiperBackend
from voxtune.eval.intelligibility import SENTENCES, intelligibility


def test_whisper_understands_the_piper_voice_within_five_percent_cer(whisper_tiny_en):
    listener = voxtune.load(str(whisper_tiny_en))
    # The benchmark scores all the sentences and every voice; the first twelve keep this quick.
    sentences = SENTENCES[:12]
    (joe,) = intelligibility(listener, PiperBackend(seed=0), ["joe"], sentences)
    (espeak,) = intelligibility(listener, EspeakBackend(), ["alloy"], sentences[:6])
    assert joe.cer <= 0.05, joe
    assert espeak.cer > 2 * max(joe.cer, 0.01)  # the formant synthesiser is harder to understand
    assert len(joe.heard) == len(sentences) and all(joe.heard)
