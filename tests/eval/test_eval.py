"""`voxtune eval`: a fixed rendered set, figures that follow the replies, the table and JSON."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from voxtune.config import load_config
from voxtune.data.synth import SynthRecipe
from voxtune.eval import evaluate_suite, format_table, load_suite, prepare
from voxtune.eval.report import SUMMARY_KEYS, judge
from voxtune.eval.suite import SuiteError, fingerprint
from voxtune.metrics import error_rates, speech_text
from voxtune.model import tiny
from voxtune.tags import tag

ROOT = Path(__file__).parents[2]
VOXTUNE = str(Path(sys.executable).with_name("voxtune"))

SMALL = {
    "name": "small",
    "version": 1,
    "corpus": {
        "seed": 3,
        "clips": 70,
        "languages": ["en", "de"],
        "identify_only": ["fr"],
        "kinds": {"statement": 1, "add": 1, "count": 1, "codeswitch": 1},
        "splits": {"train": 0.5, "test": 0.5},
        "holdout_voices": ["m7"],
        "chunk_size": 8,
    },
    "lid_min_seconds": 0.5,
    "noise": {"snr_db": [10], "clips": 4},
    "rtf_clips": 2,
    "max_new_tokens": 8,
    "targets": {"cer_heldout_voices": {"max": 0.1}, "rtf": {"max": 10.0}},
}


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("suite") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


@pytest.fixture(scope="module")
def rendered(suite_file, tmp_path_factory):
    suite = load_suite(str(suite_file))
    return suite, prepare(suite, tmp_path_factory.mktemp("cache"))


class Oracle:
    """Answers every question from the manifest's labels, for clips it has heard unchanged;
    anything else (a degraded clip) gets an empty reply. Scores must follow the replies."""

    training = False

    def __init__(self, examples, *, typo: bool = False) -> None:
        from voxtune.audio import load

        self.by_audio = {self._key(load(e.audio)): e for e in examples}
        self.typo = typo

    @staticmethod
    def _key(audio) -> str:
        return hashlib.sha1(audio.samples.tobytes()).hexdigest()

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, conversations, **_):
        single = isinstance(conversations[0], dict)
        replies = [self._reply(c) for c in ([conversations] if single else conversations)]
        return replies[0] if single else replies

    def _reply(self, conversation) -> str:
        from voxtune.data.tasks import format_segments

        parts = conversation[-1]["content"]
        audio = next(p["audio"] for p in parts if p["type"] == "audio")
        prompt = next(p["text"] for p in parts if p["type"] == "text")
        example = self.by_audio.get(self._key(audio))
        if example is None:
            return ""
        if prompt.startswith(tag("task", "transcribe")):
            return tag("lang", example.language) + (example.text[:-2] if self.typo else example.text)
        if prompt == tag("task", "language"):
            return tag("lang", example.language)
        if prompt == tag("task", "segments"):
            return format_segments(example.segments)
        if prompt == tag("task", "describe"):
            return tag("style", example.style) + (tag("intent", example.intent) if example.intent else "")
        return example.answer or ""


def test_the_set_is_the_test_split_of_the_plan_rendered_once(rendered, tmp_path):
    suite, folder = rendered
    assert sorted(p.name for p in folder.glob("*.jsonl")) == ["test.jsonl"]
    records = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert records and all(r["audio"].startswith("audio/test/") for r in records)
    assert any(r["meta"].get("identify_only") for r in records)
    before = (folder / "test.jsonl").stat().st_mtime_ns
    assert prepare(suite, folder.parent) == folder and (folder / "test.jsonl").stat().st_mtime_ns == before
    # Rendered again elsewhere: the same bytes.
    again = prepare(suite, tmp_path)
    assert fingerprint(again, "test") == fingerprint(folder, "test")


def test_identify_only_clips_carry_their_language_and_no_words(rendered):
    _, folder = rendered
    records = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    identify = [r for r in records if r["meta"].get("identify_only")]
    assert {r["language"] for r in identify} == {"fr"}
    assert all("text" not in r and "answer" not in r and "intent" not in r and r["meta"]["spoken"] for r in identify)
    mixed = [r for r in records if r.get("segments")]
    assert mixed and all(s["language"] != "fr" for r in mixed for s in r["segments"])


def test_an_oracle_scores_perfectly_and_noise_changes_what_it_hears(rendered):
    from voxtune.data.manifest import read_manifest

    suite, folder = rendered
    oracle = Oracle(read_manifest(folder / "test.jsonl"))
    report = evaluate_suite(oracle, suite, folder)
    assert report["cer_heldout_voices"] == 0.0 and report["wer_heldout_voices"] == 0.0
    assert set(report["cer_by_language"]) == {"en", "de"}
    assert report["lid_accuracy"] == report["lid_accuracy_identify_only"] == 1.0
    assert report["style_accuracy"] == report["intent_accuracy"] == report["instruction_accuracy"] == 1.0
    assert report["segments_languages_accuracy"] == 1.0 and report["segment_boundary_error_s"] == 0.0
    assert report["cer_by_condition"]["clean"] == 0.0
    assert report["cer_by_condition"]["snr10"] == report["cer_by_condition"]["telephone"] == 1.0  # not heard
    assert report["rtf"] > 0
    assert all(key in report for key in SUMMARY_KEYS)
    assert judge(report, suite) == {"cer_heldout_voices": True, "rtf": True}


def test_transcription_errors_are_counted(rendered):
    from voxtune.data.manifest import read_manifest

    suite, folder = rendered
    examples = read_manifest(folder / "test.jsonl")
    report = evaluate_suite(Oracle(examples, typo=True), suite, folder, limit=6)
    speech = [e for e in examples if e.text and not e.segments and e.language in ("en", "de")][:6]
    expected = error_rates([e.text for e in speech], [e.text[:-2] for e in speech])["cer"]
    assert report["cer_heldout_voices"] == pytest.approx(expected) and expected > 0
    assert report["limit"] == 6 and report["n_transcribed"] == len(speech)
    assert judge(report, suite)["cer_heldout_voices"] is (expected <= 0.1)


def test_scoring_normalises_case_punctuation_and_tags():
    assert speech_text("<|lang:fr|>Le nombre est-il  Douze ?") == "le nombre est il douze"
    assert error_rates(["Hello, world."], ["hello world"])["cer"] == 0.0
    assert error_rates(["abcd"], ["abxd"])["cer"] == 0.25


def test_a_real_model_fills_the_table(rendered):
    suite, folder = rendered
    report = evaluate_suite(tiny("llama", "streaming"), suite, folder, limit=3)
    table = format_table(report | {"model": "tiny"}, suite)
    for words in (
        "transcription, held-out voices",
        "language ID",
        "style",
        "intent",
        "instructions",
        "snr10",
        "real-time factor",
        "targets",
    ):
        assert words in table
    assert 0 <= report["lid_accuracy"] <= 1 and report["cer_heldout_voices"] is not None


def test_the_default_suite_plans_the_voxtune_tiny_corpus():
    suite = load_suite("default")
    data = load_config(SynthRecipe, ROOT / "recipes" / "voxtune-tiny-v3" / "data.yaml")
    # How it is rendered, and what is added to the other splits only, not what the test split plans.
    rendering_only = {"workers", "chunk_size", "perturb", "no_speech_clips"}
    assert suite.split not in data.perturb.splits
    assert suite.corpus.model_dump(exclude=rendering_only) == data.model_dump(exclude=rendering_only)
    assert set(suite.targets) == set(SUMMARY_KEYS)


def test_unknown_suites_are_named():
    with pytest.raises(SuiteError, match="no evaluation suite 'nope'.*default"):
        load_suite("nope")


def test_the_command_prints_the_table_and_writes_json(rendered, suite_file, tmp_path):
    suite, folder = rendered
    model = tmp_path / "model"
    tiny("llama", "streaming").save_pretrained(model)
    out = tmp_path / "figures.json"
    env = {**os.environ, "VOXTUNE_CACHE": str(tmp_path / "cache")}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "eval").symlink_to(folder.parent)  # the set rendered above
    result = subprocess.run(
        [VOXTUNE, "eval", "--model", str(model), "--suite", str(suite_file), "--json", str(out), "--limit", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "language ID" in result.stdout and "targets" in result.stdout
    figures = json.loads(out.read_text())
    assert all(key in figures for key in SUMMARY_KEYS) and figures["limit"] == 2
    assert figures["suite_sha256"] == fingerprint(folder, "test")


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["eval", "--suite", "nope", "--model", "{model}"], 1, "no evaluation suite"),
        (["eval", "--limit", "0", "--model", "{model}"], 2, "--limit"),
        (["eval", "--model", "{missing}"], 1, "no model directory"),
    ],
)
def test_bad_arguments_get_one_line(tmp_path, cli, args, code, words):
    model = tmp_path / "model"
    tiny("llama", "streaming").save_pretrained(model)
    args = [a.format(model=model, missing=tmp_path / "missing") for a in args]
    result = cli(*args)
    assert result.returncode == code and words in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "change, words",
    [
        ({"split": "dev"}, "split 'dev' is not one of the corpus's splits"),
        ({"targets": {"rtf": {}}}, "exactly one of min and max"),
        ({"targets": {"speed": {"max": 1}}}, "'speed' is not a summary figure"),
        ({"noise": {"kinds": ["purple"]}}, "noise.kinds"),
    ],
)
def test_bad_suite_files_are_named(tmp_path, change, words):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **change}))
    with pytest.raises(SuiteError, match=words):
        load_suite(str(path))


def test_the_default_suite_plans_the_published_clips():
    """The clips voxtune-tiny's published figures were measured on (and the test split of the
    corpus it was trained on): a change to the synthesiser's planning shows here first."""
    from voxtune.data.synth import all_voices, plan

    suite = load_suite("default")
    plans = [p for p in plan(suite.corpus, all_voices()) if p.split == suite.split]
    listing = "\n".join(f"{p.id}|{p.voice}|{p.style}|{p.language}|{p.kind}|{p.text}" for p in plans)
    assert len(plans) == 954
    assert (
        hashlib.sha256(listing.encode()).hexdigest()
        == "6ed179ce3001a5328c8ada873d06a20230d2127d2e0b7f8359a3c3a33e426977"
    )
