"""Turn detection for the Realtime API: Silero VAD (the `silero-vad` package ships its weights)
over 16 kHz audio in 32 ms frames, one model state per session.

A turn starts at the first frame whose speech probability reaches `threshold` (its start moved
back by `prefix_padding_ms`) and ends once the probability has stayed below `threshold - 0.15`
(Silero's own hysteresis) for `silence_duration_ms`. `semantic_vad` has no model of its own
here: its eagerness picks a silence length (high 350 ms, medium and auto 700 ms, low 1200 ms).

The first silent frame of a turn is reported too ("paused", at the end of that frame: where the
speech ended if the silence lasts), and speech again before the turn ends ("resumed"), so that
the session can start the reply while the silence that would end the turn is still running.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FRAME = 512  # samples at 16 kHz: the frame Silero VAD takes (32 ms)
FRAME_MS = 32
EAGERNESS_SILENCE_MS = {"high": 350, "medium": 700, "auto": 700, "low": 1200}


@dataclass
class TurnEvent:
    """A turn's start or end, in ms of the session's audio."""

    kind: str  # "started", "paused", "resumed" or "stopped"
    ms: int
    speech_end_ms: int | None = None  # "stopped": where its silence began (its "paused" ms)


class TurnDetector:
    """Feeds on a session's audio and says where turns start and stop."""

    def __init__(
        self, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500, start_ms: int = 0
    ) -> None:
        from silero_vad import load_silero_vad

        self.model = load_silero_vad()
        self.threshold = threshold
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self.pending = np.zeros(0, np.float32)
        self.heard_ms = start_ms  # session audio already run through the model
        self.speaking = False
        self.silence_ms = 0
        self.silence_from_ms = 0  # where the current silence began

    @property
    def settings(self) -> tuple[float, int, int]:
        """(threshold, prefix padding ms, silence duration ms)."""
        return self.threshold, self.prefix_padding_ms, self.silence_duration_ms

    def feed(self, samples: np.ndarray) -> list[TurnEvent]:
        """Run the new 16 kHz `samples` through the model; the turn events they cause."""
        self.pending = np.concatenate([self.pending, samples.astype(np.float32)])
        events: list[TurnEvent] = []
        with torch.no_grad():
            while len(self.pending) >= FRAME:
                frame, self.pending = self.pending[:FRAME], self.pending[FRAME:]
                probability = float(self.model(torch.from_numpy(frame.copy()), 16000))
                start = self.heard_ms
                self.heard_ms += FRAME_MS
                if probability >= self.threshold:
                    self._hear_speech(events)
                    if not self.speaking:
                        self.speaking = True
                        events.append(TurnEvent("started", max(0, start - self.prefix_padding_ms)))
                elif self.speaking and probability < self.threshold - 0.15:
                    if not self.silence_ms:
                        self.silence_from_ms = self.heard_ms
                        events.append(TurnEvent("paused", self.heard_ms))
                    self.silence_ms += FRAME_MS
                    if self.silence_ms >= self.silence_duration_ms:
                        self.speaking, self.silence_ms = False, 0
                        events.append(TurnEvent("stopped", self.heard_ms, self.silence_from_ms))
                elif self.speaking:
                    self._hear_speech(events)  # between the two thresholds: still the same turn
        return events

    def _hear_speech(self, events: list[TurnEvent]) -> None:
        """Speech (or nearly): a silence that had begun is over."""
        if self.silence_ms:
            events.append(TurnEvent("resumed", self.heard_ms))
        self.silence_ms = 0

    def reset(self) -> None:
        """Forget the audio so far (a cleared buffer); the model's state starts again."""
        self.model.reset_states()
        self.pending = np.zeros(0, np.float32)
        self.speaking, self.silence_ms = False, 0
