"""Score a model on a rendered suite: every figure of the `voxtune eval` table.

Transcripts are compared after normalisation (casefolded, punctuation removed, whitespace
collapsed: what is heard, not how it is written out), as speech recognition figures usually
are. Every reply is greedy, so a model gives the same figures run after run.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from voxtune.audio import Audio, load
from voxtune.audio.features import SAMPLE_RATE
from voxtune.data.augment import add_noise, colored_noise, telephone
from voxtune.data.example import SpeechExample
from voxtune.data.manifest import read_manifest
from voxtune.eval.suite import Suite, rendered_fingerprint
from voxtune.eval.tasks import Question, answer, questions, segment_boundary_error
from voxtune.metrics import error_rates, normalise
from voxtune.model import prompts
from voxtune.tags import tag_values

if TYPE_CHECKING:
    from voxtune.model import SpeechLM

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def evaluate_suite(
    model: SpeechLM,
    suite: Suite,
    folder: str | Path,
    *,
    name: str | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every figure of the suite's table for `model`, as one JSON-ready dict.

    Args:
        model: the model (put in eval mode).
        suite: the suite, and `folder` its rendered set (`voxtune.eval.prepare`).
        name: what the report calls the model (a path or repo id).
        limit: score only the first `limit` clips of each group (a quick look; the report says so).
        progress: called with (stage, done, total) as replies come in.
    """
    import platform

    import torch

    from voxtune import __version__

    model.eval()
    examples = list(read_manifest(Path(folder) / f"{suite.split}.jsonl"))
    transcribed = set(suite.corpus.languages)
    groups = {
        # one language per clip, transcribed: CER per language, instructions, intent
        "speech": [e for e in examples if e.text and not e.segments and e.language in transcribed],
        "mixed": [e for e in examples if e.segments],
        "identify": [e for e in examples if e.meta.get("identify_only")],
    }
    if limit is not None:
        groups = {name: group[:limit] for name, group in groups.items()}
    run = _Runner(model, suite, progress)
    sha256 = rendered_fingerprint(folder)
    report: dict[str, Any] = {
        "model": name,
        "suite": suite.name,
        "suite_version": suite.version,
        "suite_sha256": sha256,
        "suite_matches_published": suite.sha256 is None or sha256 == suite.sha256,
        "limit": limit,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "voxtune_version": __version__,
    }
    report.update(_transcription(run, groups))
    report.update(_language_id(run, groups, suite.lid_min_seconds))
    report.update(_description(run, groups))
    report.update(_instructions(run, groups["speech"]))
    report.update(_robustness(run, groups["speech"][: suite.noise.clips], suite))
    report.update(_speed(model, groups["speech"][: suite.rtf_clips], suite.max_new_tokens))
    return report


class _Runner:
    """Asks one task of many clips, batched, reporting progress."""

    def __init__(self, model: SpeechLM, suite: Suite, progress: Progress | None) -> None:
        self.model, self.suite, self.progress = model, suite, progress

    def ask(self, stage: str, examples: Sequence[SpeechExample], task: str) -> list[tuple[Question, str]]:
        out = []
        items = questions(examples, [task])
        for pair in answer(
            self.model, items, max_new_tokens=self.suite.max_new_tokens, batch_size=self.suite.batch_size
        ):
            out.append(pair)
            if self.progress:
                self.progress(stage, len(out), len(examples))
        return out


def _transcription(run: _Runner, groups: dict[str, list[SpeechExample]]) -> dict[str, Any]:
    replies = run.ask("transcription", groups["speech"] + groups["mixed"], "transcribe")
    by_language: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    mixed: tuple[list[str], list[str]] = ([], [])
    for question, reply in replies:
        example = question.example
        if example.segments:
            refs, hyps = mixed
        else:
            assert example.language is not None  # one-language clips are those of a transcribed language
            refs, hyps = by_language[example.language]
        refs.append(_transcript(example))
        hyps.append(reply)
    every = [r for lang in by_language.values() for r in lang[0]], [h for lang in by_language.values() for h in lang[1]]
    overall = error_rates(*every)
    return {
        "cer_heldout_voices": overall.get("cer"),
        "wer_heldout_voices": overall.get("wer"),
        "n_transcribed": overall.get("n", 0),
        "cer_by_language": {lang: error_rates(*pair) for lang, pair in sorted(by_language.items())},
        "cer_code_switched": error_rates(*mixed) if mixed[0] else None,
    }


def _language_id(run: _Runner, groups: dict[str, list[SpeechExample]], min_seconds: float) -> dict[str, Any]:
    def long(e: SpeechExample) -> bool:
        return e.meta.get("duration", 0.0) >= min_seconds

    single = [e for e in groups["speech"] + groups["identify"] if long(e)]
    replies = run.ask("language id", single, "language")
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    confusions: Counter[str] = Counter()
    for question, reply in replies:
        found = tag_values(reply, "lang")
        part = "identify_only" if question.example.meta.get("identify_only") else "transcribed"
        ok = found == [question.example.language]
        right[part] += ok
        total[part] += 1
        if not ok:
            confusions[f"{question.example.language}->{found[0] if found else 'none'}"] += 1
    segment_replies = run.ask("code-switching", groups["mixed"], "segments")
    boundaries = [segment_boundary_error(q.reference, r) for q, r in segment_replies]
    named = [b for b in boundaries if b is not None]
    return {
        "lid_accuracy": _ratio(sum(right.values()), sum(total.values())),
        "lid_accuracy_transcribed": _ratio(right["transcribed"], total["transcribed"]),
        "lid_accuracy_identify_only": _ratio(right["identify_only"], total["identify_only"]),
        "n_lid": sum(total.values()),
        "lid_confusions": dict(confusions.most_common(10)),
        "segments_languages_accuracy": _ratio(len(named), len(boundaries)),
        "segment_boundary_error_s": float(np.mean(named)) if named else None,
        "n_segments": len(boundaries),
    }


def _description(run: _Runner, groups: dict[str, list[SpeechExample]]) -> dict[str, Any]:
    replies = run.ask("style and intent", groups["speech"] + groups["identify"], "describe")
    style_right = style_total = intent_right = intent_total = 0
    per_style: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for question, reply in replies:
        example = question.example
        if example.style:
            ok = tag_values(reply, "style") == [example.style]
            style_right += ok
            style_total += 1
            per_style[example.style][0] += ok
            per_style[example.style][1] += 1
        if example.intent:
            intent_right += tag_values(reply, "intent") == [example.intent]
            intent_total += 1
    return {
        "style_accuracy": _ratio(style_right, style_total),
        "style_accuracy_by_style": {s: _ratio(*counts) for s, counts in sorted(per_style.items())},
        "n_style": style_total,
        "intent_accuracy": _ratio(intent_right, intent_total),
        "n_intent": intent_total,
    }


def _instructions(run: _Runner, speech: list[SpeechExample]) -> dict[str, Any]:
    replies = run.ask("instructions", [e for e in speech if e.answer], "answer")
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for question, reply in replies:
        counts = per_kind[question.example.meta.get("kind", "other")]
        counts[0] += normalise(reply) == normalise(question.reference)
        counts[1] += 1
    right = sum(c[0] for c in per_kind.values())
    total = sum(c[1] for c in per_kind.values())
    return {
        "instruction_accuracy": _ratio(right, total),
        "instruction_accuracy_by_kind": {k: _ratio(*c) for k, c in sorted(per_kind.items())},
        "n_instructions": total,
    }


def _robustness(run: _Runner, clips: list[SpeechExample], suite: Suite) -> dict[str, Any]:
    """CER of the same clips clean, at each SNR and through the telephone channel."""
    loaded = [load(e.audio, SAMPLE_RATE) for e in clips]

    def noisy(snr: float) -> Callable[[Audio, int], Audio]:
        return lambda audio, i: _noisy(audio, snr, suite, i)

    conditions: dict[str, Callable[[Audio, int], Audio]] = {"clean": lambda audio, i: audio}
    for snr in suite.noise.snr_db:
        conditions[f"snr{snr:g}"] = noisy(snr)
    if suite.noise.telephone:
        conditions["telephone"] = lambda audio, i: telephone(audio, np.random.default_rng([suite.seed, i, 1]))
    by_condition = {}
    for name, degrade in conditions.items():
        degraded = [
            dataclasses.replace(e, audio=degrade(audio, i))
            for i, (e, audio) in enumerate(zip(clips, loaded, strict=True))
        ]
        replies = run.ask(f"transcription ({name})", degraded, "transcribe")
        references = [_transcript(q.example) for q, _ in replies]
        by_condition[name] = error_rates(references, [r for _, r in replies]).get("cer")
    clean, snr10 = by_condition.get("clean"), by_condition.get("snr10")
    return {
        "cer_by_condition": by_condition,
        "n_robustness": len(clips),
        "cer_snr10_over_clean": snr10 / clean if clean and snr10 is not None else None,
    }


def _noisy(audio: Audio, snr_db: float, suite: Suite, index: int) -> Audio:
    # Seeded by (suite seed, clip, SNR): the same noise for a clip at every run.
    rng = np.random.default_rng([suite.seed, index, int(round(snr_db * 10)) & 0xFFFF])
    kind = suite.noise.kinds[int(rng.integers(len(suite.noise.kinds)))]
    return add_noise(audio, colored_noise(kind, len(audio), rng), snr_db)


def _speed(model: SpeechLM, clips: Iterable[SpeechExample], max_new_tokens: int) -> dict[str, Any]:
    """Real-time factor: seconds of compute per second of audio, transcribing one clip at a
    time from decoded samples (features, encoder, prefill and greedy decoding)."""
    audio = [load(e.audio, SAMPLE_RATE) for e in clips]
    if not audio:
        return {"rtf": None}
    model.generate(prompts.transcribe_messages(audio[0]), max_new_tokens=4, temperature=0)  # warm-up
    started = time.perf_counter()
    for clip in audio:
        model.generate(prompts.transcribe_messages(clip), max_new_tokens=max_new_tokens, temperature=0)
    elapsed = time.perf_counter() - started
    seconds = sum(a.duration for a in audio)
    return {"rtf": elapsed / seconds, "rtf_audio_seconds": seconds}


def _transcript(example: SpeechExample) -> str:
    """The transcript of a clip asked to be transcribed (the task needs one)."""
    assert example.text is not None
    return example.text


def _ratio(right: int, total: int) -> float | None:
    return right / total if total else None
