"""Distillation from the text-only LM, as Ultravox trains its audio path.

For an example with a transcript, the teacher is the LM before fine-tuning reading the same
conversation with the transcript in place of each clip; the student is the speech model
hearing the audio. Both score the same reply tokens (the processor tokenises the prompt and the
reply apart, so the reply's tokens do not depend on the prompt), and the student's next-token
distribution at each is pulled towards the teacher's: the audio path inherits what the LM
already knows from text.

Who the teacher is depends on the method: with LoRA it is the LM with its adapters switched
off; when only the projector (or the encoder's adapters) trains the LM is frozen and is its
own teacher; a full fine-tune keeps a frozen copy of the LM from before training.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from voxtune.model import SpeechLM
from voxtune.model.processor import IGNORE_INDEX, Example
from voxtune.train.losses import chunked_kl_divergence, select_predictions


def scored_tokens(example: Example) -> int:
    """How many of `example`'s tokens the loss scores (as collating or packing scores them)."""
    return sum(label != IGNORE_INDEX for label in (example.labels or [])[1:])


class Distiller:
    """Computes the distillation loss of a batch; holds (or points to) the teacher LM.

    Args:
        model: the speech model being trained, after `prepare_trainable` (what trains in it
            decides who the teacher is).
        temperature: softens both distributions (the loss is scaled by temperature^2).
        chunk_tokens: rows per chunk of the student's logits.
    """

    def __init__(self, model: SpeechLM, *, temperature: float = 1.0, chunk_tokens: int = 1024) -> None:
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        trains_lm = any(p.requires_grad and "lora_" not in name for name, p in model.lm.named_parameters())
        # A full fine-tune changes the LM itself: the teacher is a frozen copy made now.
        self._copy = copy.deepcopy(model.base_lm()).requires_grad_(False).eval() if trains_lm else None
        self._model = model

    @property
    def frozen_copy(self) -> Any:
        """The teacher's own frozen copy of the LM (a full fine-tune), or None (LoRA: the
        trained model with its adapters off)."""
        return self._copy

    @contextlib.contextmanager
    def teacher(self) -> Iterator[Any]:
        """The teacher LM (a transformers causal LM), for the duration of the block."""
        if self._copy is not None:
            yield self._copy
        else:
            with self._model.lm_adapters_disabled() as lm:
                yield lm

    def loss(self, hidden: Tensor, labels: Tensor, examples: Sequence[Example]) -> Tensor | None:
        """KL(teacher || student) over the reply tokens of the examples that have a teacher
        view (`info["teacher"]`, see `SpeechDataset(distill=True)`); None when none has.

        Args:
            hidden: [B, L, D] the student's final hidden states for the batch.
            labels: [B, L] the batch's labels (padded or packed, as collated).
            examples: the batch's examples, in the order they were collated or packed.
        """
        views = [example.info.get("teacher") for example in examples]
        if not any(views):
            return None
        rows, _ = select_predictions(hidden, labels.to(hidden.device))  # [N, D], example after example
        counts = [scored_tokens(example) for example in examples]
        if sum(counts) != rows.shape[0]:
            raise ValueError(f"the batch scores {rows.shape[0]} tokens but its examples {sum(counts)}")
        keep = torch.cat(
            [torch.full((n,), view is not None, dtype=torch.bool) for n, view in zip(counts, views, strict=True)]
        )
        for example, view in zip(examples, views, strict=True):
            if view is not None and scored_tokens(view) != scored_tokens(example):
                raise ValueError("the text-only view of an example scores other reply tokens than the example")
        teacher_logits = self._teacher_logits([view for view in views if view is not None])  # [N_kept, V]
        weight, bias, softcap = self._model.output_head()
        return chunked_kl_divergence(
            rows[keep.to(rows.device)],
            weight,
            teacher_logits,
            chunk_tokens=self.chunk_tokens,
            lm_head_bias=bias,
            logit_softcap=softcap,
            temperature=self.temperature,
        )

    @torch.no_grad()
    def _teacher_logits(self, views: list[Example]) -> Tensor:
        """The teacher's logits at its scored positions of the text-only views: [N, V]."""
        batch = self._model.processor.collate(views)
        device = self._model.device
        with self.teacher() as lm:
            decoder = lm.get_decoder()
            hidden = decoder(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).last_hidden_state  # [B, L, D]
            rows, _ = select_predictions(hidden, batch["labels"].to(device))
            logits = lm.get_output_embeddings()(rows).float()
            softcap = getattr(lm.config, "final_logit_softcapping", None)
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
        return logits
