"""The natural suite: English in a voice no model trains on, scored beside a real recogniser."""

from __future__ import annotations

import json

import voxtune
from voxtune.data.manifest import read_manifest
from voxtune.data.synth import all_voices, plan
from voxtune.eval.natural import NATURAL_KEYS, NaturalSuite, evaluate_natural, format_natural, prepare_natural
from voxtune.eval.suite import load_suite, rendered_fingerprint
from voxtune.model import tiny

SMALL = {
    "name": "natural-small",
    "version": 1,
    "kind": "natural",
    "heldout_clips": 3,
    "free": False,
    "no_speech_clips": 2,
}


def test_the_built_in_suite_loads_with_targets_it_can_judge():
    suite = load_suite("natural")
    assert isinstance(suite, NaturalSuite) and suite.voice == "joe"
    assert set(suite.targets) <= set(NATURAL_KEYS)


def test_the_clips_are_held_out_sentences_in_the_natural_voice_and_render_the_same_anywhere(tmp_path):
    suite = NaturalSuite(**SMALL)
    folder = prepare_natural(suite, tmp_path / "a")
    examples = list(read_manifest(folder / "natural.jsonl"))
    spoken = [e for e in examples if e.text]
    assert len(spoken) == 3 and len(examples) == 5
    default = load_suite("default")
    held_out = {p.text for p in plan(default.corpus, all_voices()) if p.split == "test"}
    assert all(e.text in held_out and e.language == "en" for e in spoken)
    # The Piper voice is seeded: another machine (here, another folder) renders the same bytes.
    again = prepare_natural(suite, tmp_path / "b")
    assert rendered_fingerprint(folder) == rendered_fingerprint(again)
    stamp = (folder / "ready.json").stat().st_mtime_ns
    assert prepare_natural(suite, tmp_path / "a") == folder and (folder / "ready.json").stat().st_mtime_ns == stamp


def test_the_report_puts_the_model_beside_the_reference(tmp_path, whisper_tiny_en):
    suite = NaturalSuite(**SMALL, targets={"cer_natural": {"max": 0.1}})
    folder = prepare_natural(suite, tmp_path)
    reference = voxtune.load(str(whisper_tiny_en))
    report = evaluate_natural(tiny(), suite, folder, name="random", reference=reference)
    assert report["n_speech"] == 3 and report["n_no_speech"] == 2
    assert report["reference_cer_natural"] < 0.15  # Whisper tiny.en hears the natural voice
    assert report["cer_natural"] > 0.5  # a random model does not
    assert report["cer_natural_over_reference"] > 3
    assert 0 <= report["invented_on_no_speech"] <= 1 and 0 <= report["reference_invented_on_no_speech"] <= 1
    table = format_natural(report, suite)
    assert "target cer_natural <= 0.1" in table and "missed" in table
    json.dumps(report)  # JSON-ready, for --json
