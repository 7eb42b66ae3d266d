"""Task templates: a `SpeechExample` -> a training conversation for `SpeechLM`.

The prompt of each task comes from `voxtune.model.prompts` (the same one inference uses); the
reply is built here from the example's labels, with tag tokens for what is not words.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from voxtune.data.example import Segment, SpeechExample
from voxtune.errors import InputError
from voxtune.model import prompts
from voxtune.tags import INTENTS, LANGUAGES, STYLES, tag

_T = TypeVar("_T")


class TaskError(InputError):
    """An example that cannot make the asked task, or an unknown task name."""


def format_segments(segments: Sequence[Segment]) -> str:
    """Segments as the model writes them: `0.00-1.24<|lang:en|> 1.24-2.80<|lang:de|>`."""
    return " ".join(f"{s.start:.2f}-{s.end:.2f}{tag('lang', s.language)}" for s in segments)


def parse_segments(text: str) -> list[Segment]:
    """Inverse of `format_segments`, skipping anything that does not parse (model output)."""
    found = []
    for piece in text.split():
        times, _, rest = piece.partition("<|lang:")
        start, dash, end = times.partition("-")
        try:
            found.append(Segment(float(start), float(end), rest.rstrip("|>")))
        except ValueError:
            continue
    return found


def _language_tag(example: SpeechExample) -> str:
    return tag("lang", example.language) if example.language in LANGUAGES else ""


def _transcribe(example: SpeechExample) -> list[dict]:
    if example.meta.get("no_speech"):  # nobody speaks: the transcript is nothing at all
        return prompts.transcribe_messages(example.audio) + _reply("")
    text = _require(example.text, "text", "transcribe")
    return prompts.transcribe_messages(example.audio) + _reply(_language_tag(example) + text)


def _language(example: SpeechExample) -> list[dict]:
    if example.language not in LANGUAGES:
        raise TaskError(f"task language needs a language voxtune has a tag for, got {example.language!r}")
    return prompts.language_messages(example.audio) + _reply(tag("lang", example.language))


def _segments(example: SpeechExample) -> list[dict]:
    segments = _require(example.segments, "segments", "segments")
    return prompts.segments_messages(example.audio) + _reply(format_segments(segments))


def _describe(example: SpeechExample) -> list[dict]:
    if example.style not in STYLES and example.intent not in INTENTS:
        raise TaskError("task describe needs a style or an intent")
    reply = (tag("style", example.style) if example.style in STYLES else "") + (
        tag("intent", example.intent) if example.intent in INTENTS else ""
    )
    return prompts.describe_messages(example.audio) + _reply(reply)


def _answer(example: SpeechExample) -> list[dict]:
    answer = _require(example.answer, "answer", "answer")
    # A written instruction goes before the audio as text; without one, the audio is the request.
    return prompts.answer_messages(example.audio, example.instruction) + _reply(answer)


TASKS: dict[str, Callable[[SpeechExample], list[dict]]] = {
    "transcribe": _transcribe,
    "language": _language,
    "segments": _segments,
    "describe": _describe,
    "answer": _answer,
}


def make_conversation(example: SpeechExample, task: str) -> list[dict]:
    """The training conversation for `task` on `example` (a user turn and the assistant reply)."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    return TASKS[task](example)


def text_conversation(messages: Sequence[dict], transcript: str) -> list[dict]:
    """`messages` with every audio part replaced by a text part holding `transcript`: what a
    text-only LM reads in place of the speech (the teacher's view in distillation)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {"type": "text", "text": transcript} if part.get("type") in ("audio", "input_audio") else part
                for part in content
            ]
        out.append({**message, "content": content})
    return out


def possible_tasks(example: SpeechExample) -> list[str]:
    """The tasks `example` has the labels for."""
    possible = []
    for name, make in TASKS.items():
        try:
            make(example)
        except TaskError:
            continue
        possible.append(name)
    return possible


def choose_task(example: SpeechExample, mixture: Mapping[str, float], rng: np.random.Generator) -> str:
    """Draw a task for `example` from `mixture` (weights), among the ones its labels allow."""
    unknown = set(mixture) - set(TASKS)
    if unknown:
        raise TaskError(f"unknown task {sorted(unknown)[0]!r} in the mixture (choose from {', '.join(TASKS)})")
    allowed = [t for t in possible_tasks(example) if mixture.get(t, 0) > 0]
    if not allowed:
        raise TaskError("the example has labels for none of the tasks in the mixture")
    weights = np.array([mixture[t] for t in allowed], dtype=float)
    return allowed[int(rng.choice(len(allowed), p=weights / weights.sum()))]


def _require(value: _T | None, field: str, task: str) -> _T:
    """The example's `field` (its `value`), which `task` needs: neither None nor empty."""
    if not value:
        raise TaskError(f"task {task} needs the example's {field}")
    return value


def _reply(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": text}]
