"""Task evaluation: each task's scoring rule, segment times, and whole runs on tiny models whose
replies are the model's own, all right, or all wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxtune.audio import load
from voxtune.data.example import SpeechExample
from voxtune.data.manifest import read_manifest
from voxtune.data.tasks import TASKS, TaskError, make_conversation, possible_tasks
from voxtune.eval.tasks import evaluate_tasks, score_reply, segment_boundary_error
from voxtune.model import SpeechLM, tiny

# Five labelled clips; every task is asked of some, none of all. (file, seconds, rate, record)
CLIPS = [
    ("a.wav", 1.0, 16000, {"text": "Hello there.", "language": "en", "style": "happy", "intent": "statement"}),
    (
        "b.wav",
        1.6,
        16000,
        {
            "text": "Guten Morgen and hello.",
            "language": "de",
            "intent": "statement",
            "segments": [{"start": 0.0, "end": 0.8, "language": "de"}, {"start": 0.8, "end": 1.6, "language": "en"}],
        },
    ),
    (
        "c.wav",
        1.2,
        24000,
        {
            "text": "Die Zahl ist zwölf.",
            "language": "de",
            "style": "calm",
            "instruction": "Add 3 to the number you hear.",
            "answer": "15",
        },
    ),
    ("d.wav", 1.4, 16000, {"text": "What is two plus two?", "language": "en", "intent": "question", "answer": "four"}),
    ("e.wav", 0.8, 16000, {"language": "fr"}),
]
COUNTS = {"transcribe": 4, "language": 5, "segments": 1, "describe": 4, "answer": 2}


def _tone(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (150 + 60 * seed) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list[SpeechExample]:
    """`CLIPS` as wav files and a manifest, read back: the audio is paths."""
    folder = tmp_path_factory.mktemp("eval")
    for seed, (name, seconds, rate, _) in enumerate(CLIPS):
        sf.write(folder / name, _tone(seconds, rate, seed), rate)
    lines = "".join(json.dumps({"audio": name, **record}) + "\n" for name, _, _, record in CLIPS)
    (folder / "valid.jsonl").write_text(lines, encoding="utf-8")
    return list(read_manifest(folder / "valid.jsonl"))


@pytest.fixture(scope="module")
def base() -> SpeechLM:
    return tiny("llama", "streaming", seed=0, hidden=32)


def _key(prompt: list[dict]) -> str:
    """A prompt as text, its audio by content (each run loads the clips anew)."""
    parts = [
        (
            message["role"],
            [
                hashlib.sha1(p["audio"].samples.tobytes()).hexdigest() if p["type"] == "audio" else p["text"]
                for p in message["content"]
            ],
        )
        for message in prompt
    ]
    return json.dumps(parts)


@pytest.fixture(scope="module")
def expected(examples) -> dict[str, tuple[str, str]]:
    """Every prompt the examples make (by `_key`) -> (task, the right reply)."""
    table = {}
    for example in examples:
        loaded = dataclasses.replace(example, audio=load(example.audio, 16000))
        for task in possible_tasks(loaded):
            *prompt, reply = make_conversation(loaded, task)
            table[_key(prompt)] = (task, reply["content"])
    return table


class Probe(SpeechLM):
    """A SpeechLM that records what `generate` is given and replies; with `script`, its replies
    come from there (by prompt) instead of from the LM."""

    def __init__(self, model: SpeechLM, script: dict[str, str] | None = None) -> None:
        super().__init__(model.encoder, model.projector, model.lm, model.tokenizer, model.config)
        self.script = script
        self.batches: list[list[tuple[str, str]]] = []  # per call: (prompt key, reply)
        self.calls: list[dict] = []  # per call: sampling arguments and whether in eval mode

    def generate(self, messages, **sampling):
        self.calls.append({**sampling, "eval": not self.training})
        if self.script is None:
            replies = super().generate(messages, **sampling)
        else:
            for conversation in messages:  # a prompt the model reads, ending with the user's turn
                self.processor.encode_messages(conversation, add_generation_prompt=True)
            replies = [self.script[_key(conversation)] for conversation in messages]
        self.batches.append([(_key(c), r) for c, r in zip(messages, replies, strict=True)])
        return replies


def _wrong(task: str, reply: str) -> str:
    """A reply `task` scores wrong: other tags, other words, other order, no transcript."""
    return {
        "language": "<|lang:sw|>",
        "describe": "<|style:angry|><|intent:command|>",
        "answer": "I do not know.",
        "segments": " ".join(reversed(reply.split())),
        "transcribe": "",
    }[task]


# ---- scoring --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "reference", "hypothesis", "right"),
    [
        ("language", "<|lang:en|>", "<|lang:en|>", True),
        ("language", "<|lang:en|>", "<|lang:de|>", False),
        ("language", "<|lang:en|>", "en", False),
        ("describe", "<|style:happy|><|intent:question|>", "<|intent:question|><|style:happy|>", True),
        ("describe", "<|style:happy|><|intent:question|>", "<|style:happy|><|intent:command|>", False),
        ("describe", "<|style:happy|><|intent:question|>", "<|style:sad|><|intent:question|>", False),
        ("describe", "<|style:happy|><|intent:question|>", "<|style:happy|>", False),
        ("describe", "<|style:calm|>", "<|style:calm|><|intent:command|>", True),  # no intent to check
        ("answer", "twelve", "  Twelve.", True),
        ("answer", "nine, ten,  eleven", "Nine, ten, eleven!", True),
        ("answer", "12", "<|lang:en|>12", True),
        ("answer", "twelve", "eleven", False),
        ("answer", "twelve", "twelve apples", False),
        ("answer", "nine, ten", "nine ten", False),  # only trailing punctuation goes
        ("segments", "0.00-1.00<|lang:en|> 1.00-2.00<|lang:de|>", "0.00-1.40<|lang:en|> 1.40-2.10<|lang:de|>", True),
        ("segments", "0.00-1.00<|lang:en|> 1.00-2.00<|lang:de|>", "0.00-1.00<|lang:de|> 1.00-2.00<|lang:en|>", False),
        ("segments", "0.00-1.00<|lang:en|> 1.00-2.00<|lang:de|>", "0.00-2.00<|lang:en|>", False),
        ("transcribe", "<|lang:en|>Hello there.", "hello  there", True),
        ("transcribe", "<|lang:en|>Hello there.", "Hello where.", False),
    ],
)
def test_score_reply(task, reference, hypothesis, right):
    assert score_reply(task, reference, hypothesis) is right


def test_score_reply_rejects_an_unknown_task():
    with pytest.raises(TaskError, match="unknown task"):
        score_reply("summarise", "a", "a")


def test_segment_boundary_error_is_the_mean_gap_of_starts_and_ends():
    reference = "0.00-1.00<|lang:en|> 1.00-2.50<|lang:de|>"
    # starts and ends off by 0.1, 0.2, 0.2, 0.0 s
    assert segment_boundary_error(reference, "0.10-1.20<|lang:en|> 1.20-2.50<|lang:de|>") == pytest.approx(0.125)
    assert segment_boundary_error(reference, reference) == 0.0
    assert segment_boundary_error(reference, "0.00-1.00<|lang:de|> 1.00-2.50<|lang:en|>") is None
    assert segment_boundary_error(reference, "0.00-2.50<|lang:en|>") is None
    assert segment_boundary_error(reference, "") is None


# ---- whole runs -----------------------------------------------------------------------------


def test_a_random_model_gets_every_figure_in_range(base, examples, expected):
    model = Probe(base)
    model.train()
    figures = evaluate_tasks(model, examples, list(TASKS), max_new_tokens=4, batch_size=8)

    required = {"wer", "cer"} | {f"{kind}_{task}" for task in TASKS for kind in ("acc", "n")}
    assert required <= set(figures) <= required | {"segment_error_s"}
    assert {task: figures[f"n_{task}"] for task in TASKS} == COUNTS
    assert all(0.0 <= figures[f"acc_{task}"] <= 1.0 for task in TASKS)
    assert figures["wer"] >= 0.0 and figures["cer"] >= 0.0
    # Each accuracy is the model's own replies scored, not anything else.
    replies = [pair for batch in model.batches for pair in batch]
    assert len(replies) == sum(COUNTS.values())
    for task in TASKS:
        scored = [score_reply(task, expected[key][1], reply) for key, reply in replies if expected[key][0] == task]
        assert figures[f"acc_{task}"] == sum(scored) / len(scored)
    # Greedy, in eval mode, in batches of at most 8 that mix tasks; training mode is given back.
    assert all(call["temperature"] == 0 and call["max_new_tokens"] == 4 and call["eval"] for call in model.calls)
    assert [len(batch) for batch in model.batches] == [8, 8]
    assert all(len({expected[key][0] for key, _ in batch}) > 1 for batch in model.batches)
    assert model.training


def test_replies_do_not_depend_on_the_batch(base, examples):
    """A batch of mixed tasks and prompt lengths (left-padded) replies as each prompt alone."""
    together, alone = Probe(base), Probe(base)
    evaluate_tasks(together, examples, list(TASKS), max_new_tokens=4, batch_size=16)
    evaluate_tasks(alone, examples, list(TASKS), max_new_tokens=4, batch_size=1)
    assert len(together.batches) == 1 and len(alone.batches) == sum(COUNTS.values())
    assert together.batches[0] == [pair for batch in alone.batches for pair in batch]


def test_a_model_that_answers_right_scores_perfectly(base, examples, expected):
    model = Probe(base, {key: reply for key, (_, reply) in expected.items()})
    figures = evaluate_tasks(model, examples, list(TASKS), batch_size=3)
    assert {task: figures[f"acc_{task}"] for task in TASKS} == dict.fromkeys(TASKS, 1.0)
    assert {task: figures[f"n_{task}"] for task in TASKS} == COUNTS
    assert figures["wer"] == 0.0 and figures["cer"] == 0.0
    assert figures["segment_error_s"] == 0.0
    assert [len(batch) for batch in model.batches] == [3, 3, 3, 3, 3, 1]


def test_a_model_that_answers_wrong_scores_zero(base, examples, expected):
    model = Probe(base, {key: _wrong(task, reply) for key, (task, reply) in expected.items()})
    figures = evaluate_tasks(model, examples, list(TASKS))
    assert {task: figures[f"acc_{task}"] for task in TASKS} == dict.fromkeys(TASKS, 0.0)
    # Empty transcripts count as every word and character missed.
    assert figures["wer"] == 1.0 and figures["cer"] == 1.0
    assert "segment_error_s" not in figures  # the languages came in the wrong order


def test_transcripts_are_scored_without_their_tags_against_the_text(base, examples, expected):
    """WER/CER compare the tagless reply with the example's text as `voxtune eval` does: case
    and punctuation do not count, words do."""

    def shouted(task: str, reply: str) -> str:  # "<|lang:en|>Hello there." -> "<|lang:en|>HELLO THERE"
        tag, end, text = reply.partition("|>")
        return tag + end + text.upper().rstrip(".") if task == "transcribe" else reply

    def misheard(task: str, reply: str) -> str:  # one more word in every transcript
        return reply + " indeed" if task == "transcribe" else reply

    script = {key: shouted(task, reply) for key, (task, reply) in expected.items()}
    figures = evaluate_tasks(Probe(base, script), examples, ["transcribe"])
    assert figures["acc_transcribe"] == 1.0 and figures["cer"] == 0.0 and figures["wer"] == 0.0
    script = {key: misheard(task, reply) for key, (task, reply) in expected.items()}
    figures = evaluate_tasks(Probe(base, script), examples, ["transcribe"])
    assert 0.0 < figures["cer"] <= 1.0 and figures["wer"] > 0.0


def test_only_the_asked_tasks_are_evaluated(base, examples, expected):
    unlabelled = SpeechExample(Path("/nowhere/missing.wav"), text="never asked")  # never loaded
    model = Probe(base, {key: reply for key, (_, reply) in expected.items()})
    figures = evaluate_tasks(model, [*examples, unlabelled], ["answer", "language", "answer"])
    assert figures == {"acc_answer": 1.0, "n_answer": 2, "acc_language": 1.0, "n_language": 5}
    assert evaluate_tasks(model, examples, ["segments"])["n_segments"] == 1
    assert evaluate_tasks(model, [], ["describe"]) == {"n_describe": 0}
    with pytest.raises(TaskError, match="unknown task"):
        evaluate_tasks(model, examples, ["transcribe", "summarise"])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_tasks(model, examples, ["language"], batch_size=0)
