"""CTC on the encoder: the right clips scored against the right characters."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from voxtune.model import tiny
from voxtune.model.processor import Example
from voxtune.train.ctc import alphabet, attach_ctc_head, ctc_loss


def test_the_alphabet_is_the_characters_as_heard():
    assert alphabet(["Hé, you!", "<|lang:en|>Ok"]) == [" ", "h", "k", "o", "u", "y", "é"]


def test_only_single_clip_examples_with_a_transcript_are_scored_in_clip_order():
    model = tiny("llama", "streaming")
    head = attach_ctc_head(model, list("abcdefghijklmnopqrstuvwxyz "))
    torch.manual_seed(0)
    hidden = torch.randn(5, 30, model.encoder.dim)  # [clips, frames, dim]
    lengths = torch.tensor([30, 25, 20, 30, 2])
    clip = object()  # only their count matters here
    examples = [
        Example([], None, clips=[clip], info={}),  # clip 0: no transcript
        Example([], None, clips=[clip], info={"transcript": "Hello, World!"}),  # clip 1: scored
        Example([], None, clips=[clip, clip], info={"transcript": "two"}),  # clips 2-3: which words go where?
        Example([], None, clips=[clip], info={"transcript": "too long"}),  # clip 4: 2 frames for 8 characters
    ]
    targets = head.targets("Hello, World!")
    assert targets == [head.index[c] for c in "hello world"]
    expected = F.ctc_loss(
        head(hidden[1:2]).transpose(0, 1),
        torch.tensor(targets),
        lengths[1:2],
        torch.tensor([len(targets)]),
        blank=head.blank,
        reduction="sum",
    ) / len(targets)
    assert torch.allclose(ctc_loss(model, hidden, lengths, examples), expected)


def test_nothing_to_score_is_a_zero_that_still_reaches_the_head():
    model = tiny("llama", "streaming")
    head = attach_ctc_head(model, list("ab"))
    loss = ctc_loss(
        model, torch.randn(1, 8, model.encoder.dim), torch.tensor([8]), [Example([], None, clips=[object()])]
    )
    loss.backward()
    assert loss.item() == 0 and head.proj.weight.grad is not None
