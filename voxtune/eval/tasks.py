"""Every task's greedy replies scored against the labels: what a training run reports, and
the scoring `voxtune eval` builds its suites on.

    examples = read_manifest("data/valid.jsonl")
    figures = evaluate_tasks(model, examples, ["transcribe", "language", "describe"])
    # {"wer": 0.21, "cer": 0.08, "acc_transcribe": 0.4, "n_transcribe": 50, "acc_language": 0.98, ...}

Each task is asked with the prompt training uses (`voxtune.data.tasks`) and its reply judged by
`score_reply`; transcription also gets WER/CER (jiwer), code-switched speech the error of its
segment times.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from voxtune.audio import load
from voxtune.audio.features import SAMPLE_RATE
from voxtune.data.example import SpeechExample
from voxtune.data.tasks import TASKS, TaskError, make_conversation, parse_segments, possible_tasks
from voxtune.metrics import error_rates, normalise
from voxtune.tags import tag_values

if TYPE_CHECKING:
    from voxtune.model import SpeechLM


@dataclasses.dataclass
class Question:
    """One question to the model: its task, prompt and expected reply, and the example asked
    about (its audio loaded)."""

    task: str
    prompt: list[dict]
    reference: str
    example: SpeechExample

    @property
    def text(self) -> str | None:
        """The clip's transcript."""
        return self.example.text


def score_reply(task: str, reference: str, hypothesis: str) -> bool:
    """Whether `hypothesis` is a right reply for `task`, given the expected reply `reference`.

    language: the same language tags; describe: the same style tags and the same intent tags,
    for each kind the reference has (order free); segments: the same sequence of languages
    (times are `segment_boundary_error`'s); answer and transcribe: the same text once
    casefolded, without tags, extra whitespace or trailing punctuation.

    Raises:
        TaskError: `task` is not one of voxtune's tasks.
    """
    if task == "language":
        return tag_values(hypothesis, "lang") == tag_values(reference, "lang")
    if task == "describe":
        kinds = [kind for kind in ("style", "intent") if tag_values(reference, kind)]
        return bool(kinds) and all(
            sorted(tag_values(hypothesis, kind)) == sorted(tag_values(reference, kind)) for kind in kinds
        )
    if task == "segments":
        return [s.language for s in parse_segments(hypothesis)] == [s.language for s in parse_segments(reference)]
    if task in ("answer", "transcribe"):
        return normalise(hypothesis) == normalise(reference)
    raise TaskError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")


def segment_boundary_error(reference: str, hypothesis: str) -> float | None:
    """Mean absolute difference in seconds between the segments' starts and ends in two
    segment replies (`voxtune.data.tasks.format_segments`); None unless both name the same
    languages in the same order."""
    expected, found = parse_segments(reference), parse_segments(hypothesis)
    if not expected or [s.language for s in found] != [s.language for s in expected]:
        return None
    differences = [
        abs(a - b) for e, f in zip(expected, found, strict=False) for a, b in ((e.start, f.start), (e.end, f.end))
    ]
    return sum(differences) / len(differences)


def evaluate_tasks(
    model: SpeechLM,
    examples: Sequence[SpeechExample],
    tasks: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> dict[str, float]:
    """Ask `model` every task of `tasks` that each example has the labels for, greedily, and
    score the replies.

    Args:
        model: the model to evaluate (put in eval mode for the run, then restored).
        examples: labelled clips, e.g. from `voxtune.data.manifest.read_manifest`; audio given
            as a path is loaded at 16 kHz as the training data is.
        tasks: task names (`voxtune.data.tasks.TASKS`).
        max_new_tokens: the longest reply.
        batch_size: conversations generated together (any mix of tasks).

    Returns:
        `n_<task>` (replies scored) for every task asked, and where that is above zero
        `acc_<task>` (the fraction `score_reply` finds right); `wer` and `cer` of the tagless
        transcripts when transcription was scored; `segment_error_s` (mean
        `segment_boundary_error`) when a segment reply named the right languages.

    Raises:
        TaskError: a name in `tasks` is not a task.
        ValueError: `batch_size` is below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise TaskError(f"unknown task {unknown[0]!r} (choose from {', '.join(TASKS)})")
    wanted = list(dict.fromkeys(tasks))
    was_training = model.training
    model.eval()  # no dropout: the same model gives the same figures
    try:
        replies = answer(model, questions(examples, wanted), max_new_tokens=max_new_tokens, batch_size=batch_size)
        return _figures(replies, wanted)
    finally:
        model.train(was_training)


def questions(examples: Iterable[SpeechExample], tasks: Sequence[str]) -> Iterator[Question]:
    """Each example's questions, for the tasks of `tasks` its labels allow; its audio is loaded
    (at 16 kHz) once, and only when a task is asked of it."""
    for example in examples:
        possible = possible_tasks(example)
        asked = [task for task in tasks if task in possible]
        if not asked:
            continue
        loaded = dataclasses.replace(example, audio=load(example.audio, SAMPLE_RATE))
        for task in asked:
            *prompt, reply = make_conversation(loaded, task)
            yield Question(task, prompt, reply["content"], loaded)


def answer(
    model: SpeechLM, items: Iterable[Question], *, max_new_tokens: int = 64, batch_size: int = 8
) -> Iterator[tuple[Question, str]]:
    """(question, greedy reply) in batches of `batch_size`; only one batch's audio is held at a
    time."""
    items = iter(items)
    while batch := list(itertools.islice(items, batch_size)):
        texts = model.generate([item.prompt for item in batch], max_new_tokens=max_new_tokens, temperature=0)
        yield from zip(batch, texts, strict=True)


def _figures(replies: Iterable[tuple[Question, str]], tasks: Sequence[str]) -> dict[str, float]:
    """Score the replies into the flat figures `evaluate_tasks` returns."""
    scored: Counter[str] = Counter()
    right: Counter[str] = Counter()
    references, hypotheses, boundary_errors = [], [], []
    for item, reply in replies:
        scored[item.task] += 1
        right[item.task] += score_reply(item.task, item.reference, reply)
        if item.task == "transcribe" and item.text:
            references.append(item.text)
            hypotheses.append(reply)  # empty is fine: every word missed
        if item.task == "segments" and (error := segment_boundary_error(item.reference, reply)) is not None:
            boundary_errors.append(error)
    result: dict[str, float] = {}
    rates = error_rates(references, hypotheses)
    if rates:
        result["wer"], result["cer"] = rates["wer"], rates["cer"]
    for task in tasks:
        if scored[task]:
            result[f"acc_{task}"] = right[task] / scored[task]
        result[f"n_{task}"] = scored[task]
    if boundary_errors:
        result["segment_error_s"] = sum(boundary_errors) / len(boundary_errors)
    return result
