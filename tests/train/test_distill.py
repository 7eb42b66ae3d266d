"""Distillation from the text-only LM: positions line up, the teacher is the LM before
fine-tuning, and a run with it trains."""

from __future__ import annotations

import json

import pytest
import torch

from voxtune.data.tasks import text_conversation
from voxtune.model import tiny
from voxtune.model.processor import Example
from voxtune.train.distill import Distiller, scored_tokens
from voxtune.train.recipe import TrainSection
from voxtune.train.trainer import Trainer, prepare_trainable


def _conversation(make_clip, reply="seven plus five is twelve"):
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "<|task:answer|>"}, {"type": "audio", "audio": make_clip(0.6)}],
        },
        {"role": "assistant", "content": reply},
    ]


def test_the_text_view_swaps_audio_for_the_transcript(make_clip):
    messages = _conversation(make_clip)
    view = text_conversation(messages, "what is seven plus five")
    assert view[0]["content"] == [
        {"type": "text", "text": "<|task:answer|>"},
        {"type": "text", "text": "what is seven plus five"},
    ]
    assert view[1] == messages[1]
    assert messages[0]["content"][1]["type"] == "audio"  # the original is left alone


def _student_hidden(model, batch):
    return model.base_lm().get_decoder()(**model.lm_inputs(batch)).last_hidden_state


def test_kl_is_zero_when_student_and_teacher_read_the_same(make_clip):
    """With fresh adapters (B = 0) the LoRA LM equals its base; fed the teacher's own text
    view, the KL is 0 only if the student's and teacher's positions line up exactly."""
    model = tiny("llama")
    prepare_trainable(model, TrainSection(method="lora"))
    processor = model.processor
    texts = [
        processor.encode_messages(text_conversation(_conversation(make_clip, r), "hello there"), with_labels=True)
        for r in ["twelve", "the answer is nine"]
    ]
    examples = [Example(t.input_ids, t.labels, [], {"teacher": t}) for t in texts]
    distiller = Distiller(model)
    for batch in (processor.collate(examples), processor.pack(examples)):
        kl = distiller.loss(_student_hidden(model, batch), batch["labels"], examples)
        assert kl is not None and kl.item() == pytest.approx(0.0, abs=1e-6)
    # Changing the adapters changes the student but not the teacher.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    batch = processor.collate(examples)
    assert distiller.loss(_student_hidden(model, batch), batch["labels"], examples).item() > 1e-3


def test_examples_without_a_teacher_view_are_left_out(make_clip):
    model = tiny("llama")
    prepare_trainable(model, TrainSection(method="projector"))
    processor = model.processor
    heard = processor.encode_messages(_conversation(make_clip), with_labels=True)
    distiller = Distiller(model)
    batch = processor.collate([heard])
    assert distiller.loss(_student_hidden(model, batch), batch["labels"], [heard]) is None
    view = processor.encode_messages(
        text_conversation(_conversation(make_clip), "what is seven plus five"), with_labels=True
    )
    assert scored_tokens(view) == scored_tokens(heard)  # the same reply tokens on both sides
    heard.info["teacher"] = view
    assert distiller.loss(_student_hidden(model, batch), batch["labels"], [heard]).item() > 0


def test_a_full_fine_tune_keeps_a_frozen_teacher(make_clip):
    model = tiny("llama")
    prepare_trainable(model, TrainSection(method="full"))
    distiller = Distiller(model)
    with distiller.teacher() as teacher:
        assert teacher is not model.lm and not any(p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), model.lm.parameters(), strict=True))


def test_a_run_with_distillation_trains_and_differs(tiny_recipe, tmp_path):
    runs = {}
    for name, extra in [("plain", []), ("distill", ["train.distill={weight: 0.5, temperature: 2.0}"])]:
        trainer = Trainer(tiny_recipe(tmp_path / name, "train.max_steps=4", *extra), log=lambda _: None)
        trainer.fit()
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    assert len(runs["distill"]) == 4 and all(loss > 0 for loss in runs["distill"])
    assert runs["distill"][0] != pytest.approx(runs["plain"][0], rel=1e-3)  # the KL term is in the loss
