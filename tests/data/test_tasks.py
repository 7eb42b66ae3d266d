"""Task templates: each task's conversation, its reply as the only label, the mixture draw."""

from __future__ import annotations

import numpy as np
import pytest

from voxtune.data.example import Segment, SpeechExample
from voxtune.data.tasks import (
    TASKS,
    TaskError,
    choose_task,
    format_segments,
    make_conversation,
    parse_segments,
    possible_tasks,
)
from voxtune.model import tiny
from voxtune.model.processor import IGNORE_INDEX


@pytest.fixture(scope="module")
def model():
    return tiny("qwen2", "streaming")


@pytest.fixture
def example(make_signal):
    from voxtune.audio import Audio

    return SpeechExample(
        Audio(make_signal(2.5, 16000), 16000),
        text="guten morgen und hello",
        language="de",
        style="happy",
        intent="statement",
        segments=[Segment(0.0, 1.24, "de"), Segment(1.24, 2.5, "en")],
        answer="12",
    )


EXPECTED_REPLIES = {
    "transcribe": "<|lang:de|>guten morgen und hello",
    "language": "<|lang:de|>",
    "segments": "0.00-1.24<|lang:de|> 1.24-2.50<|lang:en|>",
    "describe": "<|style:happy|><|intent:statement|>",
    "answer": "12",
}


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_trains_on_exactly_its_reply(model, example, task):
    conversation = make_conversation(example, task)
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[1]["content"] == EXPECTED_REPLIES[task]
    encoded = model.processor.encode_messages(conversation, with_labels=True)
    kept = [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert model.tokenizer.decode(kept) == EXPECTED_REPLIES[task] + "<|im_end|>"
    assert len(encoded.clips) == 1


def test_a_written_instruction_goes_before_the_audio(model, example):
    example.instruction = "Add three to the number you hear."
    user = make_conversation(example, "answer")[0]["content"]
    assert [part["type"] for part in user] == ["text", "audio"] and user[0]["text"] == example.instruction


def test_segments_round_trip_through_text():
    segments = [Segment(0.0, 0.5, "en"), Segment(0.5, 1.75, "fr")]
    assert parse_segments(format_segments(segments)) == segments
    assert parse_segments("garbage 0.1-0.2<|lang:de|>") == [Segment(0.1, 0.2, "de")]


def test_the_mixture_draws_only_possible_tasks(example):
    transcript_only = SpeechExample(example.audio, text="hello", language="xx")
    assert possible_tasks(transcript_only) == ["transcribe"]
    rng = np.random.default_rng(0)
    mixture = {"transcribe": 1.0, "language": 1.0, "describe": 2.0}
    draws = [choose_task(example, mixture, rng) for _ in range(400)]
    counts = {task: draws.count(task) for task in mixture}
    assert set(draws) == set(mixture)
    assert 0.4 < counts["describe"] / len(draws) < 0.6  # weight 2 of 4
    assert {choose_task(transcript_only, mixture, rng) for _ in range(20)} == {"transcribe"}


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda e: make_conversation(e, "summarise"), "unknown task 'summarise'"),
        (lambda e: make_conversation(SpeechExample(e.audio), "transcribe"), "needs the example's text"),
        (
            lambda e: make_conversation(SpeechExample(e.audio, language="tlh"), "language"),
            "language voxtune has a tag for",
        ),
        (
            lambda e: choose_task(SpeechExample(e.audio), {"transcribe": 1}, np.random.default_rng(0)),
            "none of the tasks",
        ),
        (lambda e: choose_task(e, {"transcribe": 1, "dance": 1}, np.random.default_rng(0)), "unknown task 'dance'"),
    ],
)
def test_errors_name_the_problem(example, call, words):
    with pytest.raises(TaskError, match=words):
        call(example)
