"""How intelligible a voice is: a listener model transcribes what the voice says, scored by CER.

The listener is any voxtune model with `transcribe` (the converted Whisper tiny.en in the
benchmark and the tests); the sentences are everyday English outside the synthetic corpus's
templates, with no numbers and in American spelling (a listener may write "seven thirty" as
"7:30", or "neighbours" as "neighbors", which is not a mistake of the voice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from voxtune.audio import Audio
from voxtune.audio.voices import VoiceBackend, synthesize
from voxtune.metrics import error_rates

__all__ = ["SENTENCES", "Listener", "VoiceScore", "intelligibility"]

SENTENCES = (
    "Hello world.",
    "The weather is lovely today.",
    "Please turn off the lights in the kitchen.",
    "Shall we walk to the river after lunch?",
    "She bought three green apples at the market.",
    "Good morning, everyone.",
    "The train leaves in a few minutes.",
    "Could you send me the report before Friday?",
    "My brother plays the guitar in a small band.",
    "We should book a table for dinner tonight.",
    "The children are reading books in the garden.",
    "I forgot my umbrella at the office.",
    "How long does it take to drive to the airport?",
    "The museum opens early and closes late.",
    "Remember to water the plants while I am away.",
    "This coffee is too hot to drink.",
    "They moved to a quiet village near the sea.",
    "Can you help me carry these boxes upstairs?",
    "The meeting has been moved to next week.",
    "Our neighbors have a friendly old dog.",
)


class Listener(Protocol):
    """A model that writes down what it hears."""

    def transcribe(self, audio: Audio) -> str: ...


@dataclass(frozen=True)
class VoiceScore:
    """One voice's scores over the sentences, and what was heard."""

    voice: str
    cer: float
    wer: float
    heard: list[str]


def intelligibility(
    listener: Listener,
    backend: VoiceBackend,
    voices: Sequence[str],
    sentences: Sequence[str] = SENTENCES,
    lang: str = "en",
) -> list[VoiceScore]:
    """Each voice of `backend` speaks every sentence; `listener` transcribes; corpus CER/WER."""
    scores = []
    for voice in voices:
        heard = [listener.transcribe(synthesize(s, lang, voice, backend=backend).resample(16000)) for s in sentences]
        rates = error_rates(list(sentences), heard)
        scores.append(VoiceScore(voice, rates["cer"], rates["wer"], heard))
    return scores
