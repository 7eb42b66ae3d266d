"""The speech synthesiser: labelled spoken corpora in many languages, from a recipe and a seed.

    voxtune data synth recipes/data/smoke.yaml --out data/smoke

It plans every clip in the parent process from the seed (text, language, voice, style, split),
then renders chunks of clips in worker processes. Each chunk gets a fresh process whose voice
engine is seeded from (seed, chunk): the engine carries state from one render to the next, so
this is what makes a corpus identical run after run, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from voxtune.audio import Audio, encode
from voxtune.audio.voices import STYLES, EspeakBackend, Style
from voxtune.config import Config, dump_config, load_config
from voxtune.data.augment import no_speech
from voxtune.data.example import Segment, SpeechExample
from voxtune.data.manifest import DataError
from voxtune.data.perturb import PerturbConfig, clip_rng, draw, perturb
from voxtune.data.phrasebook import FACT_ANSWERS, PHRASEBOOK, number_words, one_word, word_run
from voxtune.files import write_atomic

Kind = Literal[
    "words",
    "statement",
    "question",
    "command",
    "add",
    "compare",
    "repeat",
    "count",
    "spell",
    "fact",
    "add_written",
    "codeswitch",
]
INTENT_OF = {
    "statement": "statement",
    "question": "question",
    "command": "command",
    "add": "question",
    "compare": "question",
    "repeat": "command",
    "count": "command",
    "spell": "command",
    "fact": "question",
}
# Kinds only some languages have templates for (see voxtune.data.phrasebook).
_NEEDS = {"count": "count", "spell": "spell", "fact": "facts"}
PAUSE_SECONDS = 0.15  # silence between the languages of a code-switched clip
NO_SPEECH = "no_speech"  # the kind of the clips in which nobody speaks
_ESPEAK = EspeakBackend()  # the corpus is eSpeak NG speech: the natural English voice stays out of training


def _default_kinds() -> dict[Kind, float]:
    return {
        "words": 3,
        "statement": 1,
        "question": 1,
        "command": 1,
        "add": 1,
        "compare": 1,
        "repeat": 1,
        "count": 1,
        "spell": 1,
        "fact": 1,
        "add_written": 1,
        "codeswitch": 1,
    }


class SynthRecipe(Config):
    """What corpus to make. Every field has a default; see recipes/data/*.yaml."""

    seed: int = 0
    clips: int = Field(100, ge=1)
    languages: list[str] = Field(default_factory=lambda: sorted(PHRASEBOOK))
    styles: list[str] = Field(default_factory=lambda: list(STYLES))
    voices: list[str] | None = None  # engine voice variants; None: all of them
    kinds: dict[Kind, float] = Field(default_factory=_default_kinds)
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "valid": 0.1, "test": 0.1})
    holdout_voices: list[str] = Field(default_factory=list)  # only in the test split
    holdout_languages: list[str] = Field(default_factory=list)  # only in the test split
    # Languages spoken in clips labelled with their language (and style) only: no transcript,
    # answer or intent, so a model trained on them identifies them without transcribing them.
    identify_only: list[str] = Field(default_factory=list)
    identify_only_weight: float = Field(1.0, gt=0)  # how often each is drawn, against 1 for the others
    sample_rate: int = 16000
    workers: int = Field(2, ge=1)
    chunk_size: int = Field(16, ge=1)
    # Per-clip voice perturbation (another speaker and recording chain; see data/perturb.py).
    perturb: PerturbConfig = Field(default_factory=PerturbConfig)
    # Clips in which nobody speaks (silence, noise, hum; 0.5-6 s), transcribed as nothing, so a
    # model learns to write nothing for them. Planned after the speech (whose plan they leave as
    # it is), in the training split, every twentieth in the validation split; never in test.
    no_speech_clips: int = Field(0, ge=0)

    @field_validator("languages", "holdout_languages", "identify_only")
    @classmethod
    def _known_languages(cls, value: list[str]) -> list[str]:
        unknown = [code for code in value if code not in PHRASEBOOK]
        if unknown:
            raise ValueError(f"no phrasebook for {unknown} (known: {', '.join(sorted(PHRASEBOOK))})")
        return value

    @field_validator("styles")
    @classmethod
    def _known_styles(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in STYLES]
        if unknown:
            raise ValueError(f"unknown styles {unknown} (known: {', '.join(STYLES)})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SynthRecipe:
        if "test" not in self.splits and (self.holdout_voices or self.holdout_languages):
            raise ValueError("holdout voices or languages need a 'test' split")
        if set(self.identify_only) & set(self.languages):
            raise ValueError("identify_only: a language is either transcribed (languages) or identified only")
        if not any(weight > 0 for weight in self.kinds.values()):
            raise ValueError("kinds: at least one kind needs a positive weight")
        return self


@dataclass
class ClipPlan:
    """Everything needed to render one clip and label it, decided before rendering."""

    id: str
    split: str
    kind: str
    voice: str
    style: str
    style_jitter: dict[str, int]  # the voice's own random pitch / range / rate / volume offsets
    parts: list[tuple[str, str]]  # (language, text) rendered one after the other
    text: str
    language: str
    answer: str | None = None
    instruction: str | None = None
    intent: str | None = None
    identify_only: bool = False  # labelled with its language and style only


@dataclass
class SynthSummary:
    """What a run made."""

    clips: int
    seconds: float
    wall_seconds: float
    per_split: dict[str, int] = field(default_factory=dict)

    @property
    def hours_per_minute(self) -> float:
        """Audio hours made per minute of wall time."""
        return (self.seconds / 3600) / max(self.wall_seconds / 60, 1e-9)


# ---- planning ---------------------------------------------------------------------------------


def plan(recipe: SynthRecipe, voices: list[str]) -> list[ClipPlan]:
    """Every clip of the corpus, deterministic in `recipe.seed`."""
    rng = np.random.default_rng(recipe.seed)
    voice_split = _assign_voices(voices, recipe, rng)
    kinds = [k for k, w in recipe.kinds.items() if w > 0]
    weights = np.array([recipe.kinds[k] for k in kinds], dtype=float)
    splits = list(recipe.splits)
    split_weights = np.array([recipe.splits[s] for s in splits], dtype=float)
    plans: list[ClipPlan] = []
    seen: dict[str, str] = {}  # text -> the split it went to
    for index in range(recipe.clips):
        split = splits[int(rng.choice(len(splits), p=split_weights / split_weights.sum()))]
        languages = _languages_for(split, recipe)
        split_voices = [v for v, s in voice_split.items() if s == split] or list(voice_split)
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        # Sentences are kept disjoint across splits: draw until the text hashes to this split
        # (or was already used in it).
        for _ in range(1000):
            parts, text, answer, instruction = _draw_text(
                kind, languages, rng, recipe.identify_only, recipe.identify_only_weight
            )
            if (seen.get(text) or _hash_split(text, recipe)) == split:
                break
        else:
            raise ValueError(f"cannot find a {kind} sentence for the {split} split; add languages or kinds")
        seen[text] = split
        plans.append(
            ClipPlan(
                id=f"{index:06d}",
                split=split,
                kind=kind,
                voice=str(rng.choice(split_voices)),
                style=str(rng.choice(recipe.styles)),
                style_jitter=_jitter(rng),
                parts=parts,
                text=text,
                language=parts[0][0],
                answer=answer,
                instruction=instruction,
                intent=INTENT_OF.get(kind),
                identify_only=parts[0][0] in recipe.identify_only,
            )
        )
    for index in range(recipe.no_speech_clips):
        split = "valid" if index % 20 == 19 and "valid" in recipe.splits else "train"
        plans.append(
            ClipPlan(
                id=f"n{index:05d}",
                split=split,
                kind=NO_SPEECH,
                voice="",
                style="",
                style_jitter={},
                parts=[],
                text="",
                language="",
            )
        )
    return plans


def _assign_voices(voices: list[str], recipe: SynthRecipe, rng: np.random.Generator) -> dict[str, str]:
    held = set(recipe.holdout_voices)
    others = [v for v in voices if v not in held]
    order = rng.permutation(len(others))
    splits = [s for s in recipe.splits if recipe.splits[s] > 0]
    share = np.array([recipe.splits[s] for s in splits]) / sum(recipe.splits[s] for s in splits)
    bounds = np.ceil(np.cumsum(share) * len(others)).astype(int)
    assignment = {v: "test" for v in voices if v in held}
    for rank, i in enumerate(order):
        assignment[others[i]] = splits[int(np.searchsorted(bounds, rank, side="right"))]
    return assignment


def _languages_for(split: str, recipe: SynthRecipe) -> list[str]:
    spoken = recipe.languages + recipe.identify_only
    if split == "test":
        return spoken + [code for code in recipe.holdout_languages if code not in spoken]
    return [code for code in spoken if code not in recipe.holdout_languages]


def _hash_split(text: str, recipe: SynthRecipe) -> str:
    digest = int(hashlib.sha1(f"{recipe.seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    total = sum(recipe.splits.values())
    edge = 0.0
    for name, weight in recipe.splits.items():
        edge += weight / total
        if digest <= edge:
            return name
    return list(recipe.splits)[-1]


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _draw_text(
    kind: str,
    languages: list[str],
    rng: np.random.Generator,
    identify_only: Collection[str] = (),
    identify_weight: float = 1.0,
):
    """(parts, transcript, answer, written instruction) for one clip of `kind`; languages in
    `identify_only` are drawn `identify_weight` times as often as the others and are never
    mixed into a code-switched clip."""
    if kind in _NEEDS:  # only languages with the template; none of those: an addition instead
        able = [code for code in languages if getattr(PHRASEBOOK[code], _NEEDS[kind])]
        languages, kind = (able, kind) if able else (languages, "add")
    if identify_only:
        weights = np.array([identify_weight if code in identify_only else 1.0 for code in languages])
        lang = str(rng.choice(languages, p=weights / weights.sum()))
    else:  # the unweighted draw corpora without identify_only languages were always made with
        lang = str(rng.choice(languages))
    book = PHRASEBOOK[lang]
    words = lambda n: number_words(int(n), lang)  # noqa: E731
    if kind == "words":  # real words; a statement where there is no word list for the language
        text = word_run(lang, rng)
        if text is not None:
            return [(lang, text)], text, None, None
        kind = "statement"
    if kind in ("statement", "question", "command"):
        text = _capitalise(getattr(book, kind).format(n=words(rng.integers(0, 1000))))
        return [(lang, text)], text, None, None
    if kind == "add":
        a, b = (int(x) for x in rng.integers(0, 50, size=2))
        text = _capitalise(book.add.format(a=words(a), b=words(b)))
        return [(lang, text)], text, words(a + b), None
    if kind == "compare":
        a, b = (int(x) for x in rng.choice(100, size=2, replace=False))
        text = _capitalise(book.compare.format(a=words(a), b=words(b)))
        return [(lang, text)], text, words(max(a, b)), None
    if kind == "repeat":
        items = book.list_sep.join(words(x) for x in rng.integers(0, 100, size=3))
        text = _capitalise(book.repeat.format(items=items))
        return [(lang, text)], text, items, None
    if kind == "count":
        assert book.count is not None  # kinds in _NEEDS are drawn only in languages that have them
        a = int(rng.integers(0, 20))
        b = a + int(rng.integers(2, 5))
        text = _capitalise(book.count.format(a=words(a), b=words(b)))
        return [(lang, text)], text, book.list_sep.join(words(n) for n in range(a, b + 1)), None
    if kind == "spell":
        assert book.spell is not None
        word = one_word(lang, rng)
        assert word is not None  # a language with the spell template has a word list
        text = _capitalise(book.spell.format(word=word))
        return [(lang, text)], text, " ".join(word), None
    if kind == "fact":
        assert book.facts is not None
        which = int(rng.integers(len(book.facts)))
        return [(lang, book.facts[which])], book.facts[which], words(FACT_ANSWERS[which]), None
    if kind == "add_written":  # the request is written (English), the number is heard
        n, k = int(rng.integers(0, 100)), int(rng.integers(1, 10))
        text = _capitalise(book.statement.format(n=words(n)))
        return [(lang, text)], text, str(n + k), f"Add {k} to the number you hear."
    # codeswitch: two or three languages, one statement each
    languages = [code for code in languages if code not in identify_only] or languages
    count = min(len(languages), int(rng.integers(2, 4)))
    chosen = [str(code) for code in rng.choice(languages, size=count, replace=False)]
    parts = [
        (code, _capitalise(PHRASEBOOK[code].statement.format(n=number_words(int(rng.integers(0, 100)), code))))
        for code in chosen
    ]
    return parts, " ".join(text for _, text in parts), None, None


def _jitter(rng: np.random.Generator) -> dict[str, int]:
    """Per-clip offsets so that one voice is not one fixed pitch, rate and loudness."""
    return {
        "pitch": int(rng.integers(-8, 9)),
        "pitch_range": int(rng.integers(-10, 11)),
        "rate": int(rng.integers(-15, 16)),
        "volume": int(rng.integers(-20, 21)),
    }


# ---- rendering --------------------------------------------------------------------------------


def _style(plan: ClipPlan) -> Style:
    base = STYLES[plan.style]
    j = plan.style_jitter
    return Style(
        pitch=int(np.clip(base.pitch + j["pitch"], 0, 100)),
        pitch_range=int(np.clip(base.pitch_range + j["pitch_range"], 0, 100)),
        rate=max(80, base.rate + j["rate"]),
        volume=max(10, base.volume + j["volume"]),
        pause=base.pause,
        whisper=base.whisper,
    )


def render_clip(plan: ClipPlan, sample_rate: int, seed: int = 0) -> tuple[Audio, list[Segment]]:
    """The clip's audio at `sample_rate` and the segment of each of its languages (a clip with
    no speech is drawn from `seed` and its id)."""
    if plan.kind == NO_SPEECH:
        rng = clip_rng(seed, plan.id)
        return no_speech(float(rng.uniform(0.5, 6.0)), sample_rate, rng), []
    backend, style = _ESPEAK, _style(plan)
    pieces, segments, cursor = [], [], 0
    for i, (lang, text) in enumerate(plan.parts):
        chunks = list(backend.render(text, lang, plan.voice, style, 1.0))
        audio = Audio(np.concatenate([c.samples for c in chunks]), chunks[0].sample_rate).resample(sample_rate)
        if i:  # a short pause between languages
            pieces.append(np.zeros(int(PAUSE_SECONDS * sample_rate), np.float32))
            cursor += len(pieces[-1])
        pieces.append(audio.samples)
        segments.append(
            Segment(round(cursor / sample_rate, 3), round((cursor + len(audio)) / sample_rate, 3), lang, text)
        )
        cursor += len(audio)
    return Audio(np.concatenate(pieces), sample_rate), segments


def _rescaled(segments: list[Segment], tempo: float) -> list[Segment]:
    """Segment times after the clip was sped up by `tempo`."""
    return [Segment(round(s.start / tempo, 3), round(s.end / tempo, 3), s.language, s.text) for s in segments]


def _render_chunk(args: tuple[int, int, list[dict], int, str, dict]) -> list[tuple[str, dict]]:
    """Worker: render one chunk of clips in this (fresh) process; returns their (split, record)s."""
    seed, chunk_index, plans, sample_rate, out_dir, perturb_config = args
    _ESPEAK.reseed(seed * 1_000_003 + chunk_index)
    perturbing = PerturbConfig(**perturb_config)
    records: list[tuple[str, dict]] = []
    for data in plans:
        clip_plan = ClipPlan(**data)
        audio, segments = render_clip(clip_plan, sample_rate, seed)
        if clip_plan.kind == NO_SPEECH:
            relative = f"audio/{clip_plan.split}/{clip_plan.id}.wav"
            write_atomic(Path(out_dir) / relative, encode(audio, "wav"))
            meta = {"kind": NO_SPEECH, "duration": round(audio.duration, 3), "id": clip_plan.id, "no_speech": True}
            records.append((clip_plan.split, SpeechExample(relative, meta=meta).to_record(relative)))
            continue
        perturbation = draw(perturbing, clip_plan.split, clip_rng(seed, clip_plan.id))
        if perturbation is not None:
            audio = perturb(audio, perturbation)
            segments = _rescaled(segments, perturbation["tempo"])
        relative = f"audio/{clip_plan.split}/{clip_plan.id}.wav"
        write_atomic(Path(out_dir) / relative, encode(audio, "wav"))
        meta = {"kind": clip_plan.kind, "duration": round(audio.duration, 3), "id": clip_plan.id}
        if perturbation is not None:
            meta["perturb"] = perturbation
        if clip_plan.identify_only:  # what was said stays on record, out of the labels
            example = SpeechExample(
                relative,
                language=clip_plan.language,
                style=clip_plan.style,
                speaker=clip_plan.voice,
                meta={**meta, "identify_only": True, "spoken": clip_plan.text},
            )
        else:
            example = SpeechExample(
                relative,
                text=clip_plan.text,
                language=clip_plan.language,
                style=clip_plan.style,
                intent=clip_plan.intent,
                segments=segments if len(segments) > 1 else None,
                instruction=clip_plan.instruction,
                answer=clip_plan.answer,
                speaker=clip_plan.voice,
                meta=meta,
            )
        records.append((clip_plan.split, example.to_record(relative)))
    return records


def synthesize_corpus(
    recipe: SynthRecipe,
    out_dir: str | Path,
    *,
    splits: Collection[str] | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> SynthSummary:
    """Render the corpus of `recipe` into `out_dir`: audio/<split>/*.wav, <split>.jsonl
    manifests (records sorted by id) and the resolved recipe.yaml. With `splits`, only the
    clips of those splits are rendered (the plan, and so what each split holds, is the whole
    corpus's: e.g. a test split without the cost of the training split)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    voices = recipe.voices or all_voices()
    wanted = list(recipe.splits) if splits is None else [s for s in recipe.splits if s in splits]
    if splits is not None and set(splits) - set(recipe.splits):
        raise ValueError(f"no split {sorted(set(splits) - set(recipe.splits))[0]!r} in the recipe")
    plans = [p for p in plan(recipe, voices) if p.split in wanted]
    chunks = [plans[i : i + recipe.chunk_size] for i in range(0, len(plans), recipe.chunk_size)]
    jobs = [
        (recipe.seed, i, [asdict(p) for p in chunk], recipe.sample_rate, str(out), recipe.perturb.model_dump())
        for i, chunk in enumerate(chunks)
    ]
    started = time.perf_counter()
    records: list[tuple[str, dict]] = []
    # A fresh process per chunk (maxtasksperchild=1): each chunk renders from a clean engine.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=min(recipe.workers, len(jobs)), maxtasksperchild=1) as pool:
        for chunk_records in pool.imap_unordered(_render_chunk, jobs):
            records += chunk_records
            if progress:
                progress(len(records), len(plans))
    wall = time.perf_counter() - started
    by_split: dict[str, list[dict]] = {name: [] for name in wanted}
    for split, record in sorted(records, key=lambda r: r[1]["meta"]["id"]):
        by_split[split].append(record)
    for split, split_records in by_split.items():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_records)
        write_atomic(out / f"{split}.jsonl", lines.encode())
    write_atomic(out / "recipe.yaml", dump_config(recipe).encode())
    seconds = sum(r["meta"]["duration"] for _, r in records)
    return SynthSummary(len(records), seconds, wall, {s: len(r) for s, r in by_split.items()})


def make_missing_corpus(
    recipe_path: str | Path, manifests: Sequence[str | Path], *, log: Callable[[str], object] = print
) -> SynthSummary | None:
    """Render the corpus of the data recipe at `recipe_path` into the folder of the first of
    `manifests` unless all of them exist (a training recipe's `data.synth`); None when nothing
    was missing. Fails before any synthesis when a missing manifest is not one it would write."""
    paths = [Path(p) for p in manifests]
    if all(p.exists() for p in paths):
        return None
    recipe = load_config(SynthRecipe, recipe_path)
    out = paths[0].parent
    will_write = {out / f"{split}.jsonl" for split in recipe.splits}
    missing = [p for p in paths if not p.exists() and p not in will_write]
    if missing:
        raise DataError(
            f"no such manifest {missing[0]}, and data.synth ({recipe_path}) would not make it: it writes "
            f"{', '.join(sorted(str(p) for p in will_write))}"
        )
    log(f"making the corpus of {recipe_path} in {out}")
    summary = synthesize_corpus(recipe, out)
    log(f"made {summary.clips} clips ({summary.seconds / 60:.1f} min of audio)")
    return summary


def all_voices() -> list[str]:
    """Every engine voice variant but the whisper ones (whispering is a style)."""
    return [
        v.name
        for v in _ESPEAK.list_voices()
        if v.name == v.backend_voice and v.name.lower() not in ("whisper", "whisperf")
    ]
