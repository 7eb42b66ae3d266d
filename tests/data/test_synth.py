"""The synthesiser: labels match the audio, splits are disjoint, runs are reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from voxtune.audio import load
from voxtune.audio.prosody import pitch
from voxtune.config import ConfigError, load_config
from voxtune.data.manifest import DataError, read_manifest
from voxtune.data.synth import ClipPlan, SynthRecipe, make_missing_corpus, plan, render_clip, synthesize_corpus

SMOKE = Path(__file__).parents[2] / "recipes" / "data" / "smoke.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    recipe = load_config(SynthRecipe, SMOKE)
    out = tmp_path_factory.mktemp("smoke")
    summary = synthesize_corpus(recipe, out)
    records = {
        split: [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        for split in recipe.splits
    }
    return recipe, out, summary, records


def test_a_training_recipes_corpus_is_made_only_when_missing_and_fails_fast(corpus, tmp_path):
    recipe, out, *_ = corpus
    said: list[str] = []
    manifests = [out / f"{split}.jsonl" for split in recipe.splits]
    assert make_missing_corpus(SMOKE, manifests, log=said.append) is None  # all there: nothing made
    assert said == []
    # A missing manifest the recipe would not write fails before any synthesis.
    with pytest.raises(DataError, match=r"no such manifest .*extra.jsonl, and data.synth .* would not make it"):
        make_missing_corpus(SMOKE, [tmp_path / "train.jsonl", tmp_path / "extra.jsonl"], log=said.append)
    assert said == [] and not (tmp_path / "train.jsonl").exists()


def test_the_smoke_recipe_covers_every_kind_style_and_split(corpus):
    recipe, out, summary, records = corpus
    every = [r for split in records.values() for r in split]
    assert summary.clips == len(every) == recipe.clips
    assert {r["meta"]["kind"] for r in every} == set(recipe.kinds)
    assert {r["style"] for r in every} == set(recipe.styles)
    assert len({r["language"] for r in every}) >= 5
    assert all(records[split] for split in recipe.splits)
    assert summary.seconds > 60 and summary.hours_per_minute > 0


def test_manifests_read_back_and_durations_match_the_files(corpus):
    recipe, out, _, records = corpus
    for split in recipe.splits:
        examples = read_manifest(out / f"{split}.jsonl")
        assert len(examples) == len(records[split])
        for example, record in zip(examples, records[split], strict=True):
            audio = load(example.audio)
            assert audio.duration == pytest.approx(record["meta"]["duration"], abs=1e-3)
            assert example.text and example.speaker


def test_code_switched_segments_line_up_with_the_audio(corpus):
    _, out, _, records = corpus
    switched = [r for split in records.values() for r in split if r["meta"]["kind"] == "codeswitch"]
    assert switched
    for record in switched:
        audio = load(out / record["audio"])
        segments = record["segments"]
        assert 2 <= len(segments) <= 3 and len({s["language"] for s in segments}) == len(segments)
        assert segments[0]["start"] == 0 and segments[-1]["end"] == pytest.approx(audio.duration, abs=1e-3)
        assert record["text"] == " ".join(s["text"] for s in segments)
        for before, after in zip(segments[:-1], segments[1:], strict=True):
            gap = audio.samples[int(before["end"] * 16000) + 80 : int(after["start"] * 16000) - 80]
            assert after["start"] - before["end"] == pytest.approx(0.15, abs=2e-3)
            assert np.abs(gap).max() < 1e-3  # the pause between languages is silence
        for segment in segments:
            speech = audio.samples[int(segment["start"] * 16000) : int(segment["end"] * 16000)]
            assert np.sqrt(np.mean(speech**2)) > 0.01


def test_splits_are_disjoint_by_voice_and_sentence_and_hold_out_voices(corpus):
    recipe, _, _, records = corpus
    voices = {split: {r["speaker"] for r in rs} for split, rs in records.items()}
    texts = {split: {r["text"] for r in rs} for split, rs in records.items()}
    splits = list(records)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not voices[a] & voices[b] and not texts[a] & texts[b]
    for held in recipe.holdout_voices:
        assert all(held not in voices[split] for split in splits if split != "test")


def test_answers_are_right(corpus):
    _, _, _, records = corpus
    english = [r for rs in records.values() for r in rs if r["language"] == "en" and r["meta"]["kind"] == "add_written"]
    for record in english:
        n = _english_number(record["text"].removeprefix("The number is ").rstrip("."))
        k = int(record["instruction"].split()[1])
        assert record["answer"] == str(n + k)


def test_every_kind_gives_the_right_answer():
    from voxtune.data.phrasebook import FACT_ANSWERS, PHRASEBOOK, WORD_LIST_LOCALES
    from voxtune.data.synth import _draw_text

    rng = np.random.default_rng(0)
    for _ in range(30):
        _, text, answer, _ = _draw_text("count", ["en"], rng)
        numbers = [_english_number(w) for w in answer.split(", ")]
        assert numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) >= 3
        assert text == f"Count from {answer.split(', ')[0]} to {answer.split(', ')[-1]}."
        _, text, answer, _ = _draw_text("spell", ["de"], rng)
        assert text.endswith(answer.replace(" ", "") + ".")
        _, text, answer, _ = _draw_text("fact", ["en"], rng)
        assert _english_number(answer) == FACT_ANSWERS[PHRASEBOOK["en"].facts.index(text)]
    assert all(lang in WORD_LIST_LOCALES for lang, book in PHRASEBOOK.items() if book.spell)
    _, text, _, _ = _draw_text("count", ["fi"], rng)  # no count template in Finnish: an addition
    assert text.startswith("Paljonko on")


def _english_number(words: str) -> int:
    from num2words import num2words

    return next(n for n in range(1000) if num2words(n, lang="en") == words)


def test_runs_are_reproducible_whatever_the_workers(tmp_path):
    recipe = SynthRecipe(clips=12, languages=["en", "fr"], workers=1, chunk_size=4, seed=3)
    synthesize_corpus(recipe, tmp_path / "one")
    synthesize_corpus(recipe.model_copy(update={"workers": 3}), tmp_path / "three")
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()
    wavs = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.wav"))
    assert wavs and all((tmp_path / "one" / w).read_bytes() == (tmp_path / "three" / w).read_bytes() for w in wavs)


def test_styles_change_pitch_and_rate_measurably():
    base = dict(
        id="x",
        split="train",
        kind="statement",
        voice="m3",
        style_jitter={"pitch": 0, "pitch_range": 0, "rate": 0, "volume": 0},
        parts=[("en", "The number is three hundred and twelve. Is that right?")],
        text="",
        language="en",
    )
    happy, _ = render_clip(ClipPlan(style="happy", **base), 16000)
    sad, _ = render_clip(ClipPlan(style="sad", **base), 16000)
    assert np.nanmean(pitch(happy)) > 1.25 * np.nanmean(pitch(sad))
    assert sad.duration > 1.25 * happy.duration


def test_holdout_languages_only_in_test():
    recipe = SynthRecipe(clips=60, languages=["en", "de", "fr"], holdout_languages=["fr"], seed=1)
    plans = plan(recipe, ["m1", "m2", "f1", "f2", "f3", "m3"])
    assert all(p.split == "test" for p in plans if any(lang == "fr" for lang, _ in p.parts))
    assert any(lang == "fr" for p in plans for lang, _ in p.parts)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["languages=[en, tlh]"], "no phrasebook"),
        (["kinds.sing=1"], "kinds.sing"),
        (["styles=[grumpy]"], "unknown styles"),
        (["splits={train: 1}", "holdout_voices=[m1]"], "need a 'test' split"),
    ],
)
def test_bad_recipes_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(SynthRecipe, SMOKE, overrides)


def test_word_runs_are_real_words_and_reproducible():
    from voxtune.data.phrasebook import word_run

    first = word_run("de", np.random.default_rng(5))
    assert first == word_run("de", np.random.default_rng(5)) and 4 <= len(first.split()) <= 9
    assert first != word_run("de", np.random.default_rng(6))
    assert word_run("hi", np.random.default_rng(5)) is None  # no word list: the caller falls back


def test_identify_only_languages_are_drawn_by_their_weight_and_never_code_switched():
    def planned(weight):
        recipe = SynthRecipe(
            clips=300,
            languages=["en", "de"],
            identify_only=["fr", "es"],
            identify_only_weight=weight,
            kinds={"statement": 1, "codeswitch": 1},
            seed=4,
        )
        return plan(recipe, ["m1", "m2", "f1", "f2", "m3"])

    even, rare = planned(1.0), planned(0.2)

    def share(plans):  # among the single-language clips (code-switched ones never identify only)
        single = [p for p in plans if p.kind == "statement"]
        return sum(p.identify_only for p in single) / len(single)

    assert 0.35 < share(even) < 0.65 and share(rare) < 0.5 * share(even)
    assert all(p.language in ("fr", "es") for p in even if p.identify_only)
    mixed = [p for p in even if p.kind == "codeswitch"]
    assert mixed and all(lang in ("en", "de") for p in mixed for lang, _ in p.parts)


def test_a_language_is_transcribed_or_identified_only():
    with pytest.raises(ConfigError, match="identify_only"):
        load_config(SynthRecipe, {"languages": ["en", "fr"], "identify_only": ["fr"]})


def test_rendering_some_splits_renders_the_same_plan(tmp_path):
    recipe = SynthRecipe(clips=24, languages=["en"], kinds={"statement": 1}, splits={"train": 0.5, "test": 0.5}, seed=6)
    summary = synthesize_corpus(recipe, tmp_path, splits=["test"])
    expected = [p.text for p in plan(recipe, recipe.voices or _voices()) if p.split == "test"]
    assert [e.text for e in read_manifest(tmp_path / "test.jsonl")] == expected
    assert summary.per_split == {"test": len(expected)} and not (tmp_path / "train.jsonl").exists()
    with pytest.raises(ValueError, match="no split 'dev'"):
        synthesize_corpus(recipe, tmp_path, splits=["dev"])


def _voices():
    from voxtune.data.synth import all_voices

    return all_voices()


def test_no_speech_clips_come_after_the_speech_and_are_transcribed_as_nothing(tmp_path):
    from voxtune.data.tasks import make_conversation, possible_tasks

    speech = SynthRecipe(clips=10, languages=["en"], kinds={"statement": 1}, seed=8, workers=1)
    quiet = speech.model_copy(update={"no_speech_clips": 40})
    voices = _voices()
    assert plan(quiet, voices)[:10] == plan(speech, voices)  # the speech's plan is left as it was
    summary = synthesize_corpus(quiet, tmp_path)
    assert summary.clips == 50
    examples = [e for split in ("train", "valid") for e in read_manifest(tmp_path / f"{split}.jsonl")]
    silent = [e for e in examples if e.meta.get("no_speech")]
    assert len(silent) == 40 and sum(1 for e in silent if "/valid/" in str(e.audio)) == 2
    assert not any(e.meta.get("no_speech") for e in read_manifest(tmp_path / "test.jsonl"))
    for example in silent:
        audio = load(example.audio)
        assert 0.5 <= audio.duration <= 6.0 and example.text is None
        assert float(np.sqrt(np.mean(audio.samples**2))) < 10 ** (-11 / 20)  # at most -12 dBFS, by design
        assert possible_tasks(example) == ["transcribe"]
        assert make_conversation(example, "transcribe")[-1] == {"role": "assistant", "content": ""}
    levels = {round(float(np.abs(load(e.audio).samples).max()), 3) for e in silent}
    assert 0.0 in levels and len(levels) > 20  # digital silence, and many different levels
