"""CTC on the encoder: an auxiliary loss that teaches an encoder trained from scratch to hear.

Through the LM alone, a random encoder gets its first useful gradient only once the LM has
learned to look at the audio, and the two wait on each other for a long time. A CTC head on the
encoder's frames, predicting the transcript's characters, gives the encoder a direct signal
from the first step (as hybrid CTC/attention speech recognisers do). Characters rather than
the LM's tokens: a few dozen classes per script, each heard in every clip, are learned far
sooner than a thousand sub-words. The head is used in training only: it is not part of the
exported model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from voxtune.metrics import speech_text
from voxtune.model.processor import Example

if TYPE_CHECKING:
    from voxtune.model import SpeechLM

HEAD = "ctc_head"  # the head's name on the model, so checkpoints and the optimizer see it


def alphabet(transcripts: Iterable[str]) -> list[str]:
    """The characters of `transcripts` as heard (`speech_text`), sorted: the CTC classes."""
    return sorted({c for text in transcripts for c in speech_text(text)})


class CtcHead(nn.Module):
    """Encoder frames [N, T, D] -> log-probabilities [N, T, len(chars) + 1]; the last index is blank."""

    def __init__(self, dim: int, chars: Sequence[str]) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, len(chars) + 1)
        self.index = {c: i for i, c in enumerate(chars)}
        self.blank = len(chars)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.proj(hidden).float(), dim=-1)

    def targets(self, transcript: str) -> list[int]:
        """The class ids of `transcript` as heard (characters outside the alphabet dropped)."""
        return [self.index[c] for c in speech_text(transcript) if c in self.index]


def attach_ctc_head(model: SpeechLM, chars: Sequence[str]) -> CtcHead:
    """Give `model` (a `SpeechLM`) a new CTC head over `chars` (see `alphabet`)."""
    width = cast(int, model.encoder.dim)  # every encoder kind has its output width as `dim`
    head = CtcHead(width, chars).to(model.device)
    model.add_module(HEAD, head)
    return head


def ctc_loss(model: SpeechLM, hidden: torch.Tensor, lengths: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    """Mean CTC loss (per target character) of the clips whose example carries a transcript
    (`info["transcript"]`, one clip per example).

    `hidden` [N, T, D] and `lengths` [N] are the encoder's outputs for the batch's clips, in
    the order the examples hold them. With no clip to score, a zero that still reaches the
    head: under DDP every process must give every trained weight a gradient.
    """
    head: CtcHead = getattr(model, HEAD)
    frames = lengths.tolist()
    rows, targets = [], []
    row = 0
    for example in examples:
        transcript = example.info.get("transcript")
        if transcript and len(example.clips) == 1:
            ids = head.targets(transcript)
            if ids and len(ids) <= frames[row]:  # CTC needs a frame per character at least
                rows.append(row)
                targets.append(ids)
        row += len(example.clips)
    if not rows:
        return cast(torch.Tensor, 0.0 * sum(p.sum() for p in head.parameters()))  # a Tensor: the head has weights
    index = torch.tensor(rows, device=hidden.device)
    log_probs = head(hidden.index_select(0, index)).transpose(0, 1)  # [T, n, classes]
    flat = torch.tensor([t for ids in targets for t in ids], device=hidden.device)
    target_lengths = torch.tensor([len(ids) for ids in targets], device=hidden.device)
    loss = F.ctc_loss(
        log_probs,
        flat,
        lengths.index_select(0, index),
        target_lengths,
        blank=head.blank,
        reduction="sum",
        zero_infinity=True,
    )
    return loss / target_lengths.sum()
