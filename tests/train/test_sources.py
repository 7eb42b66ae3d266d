"""A recipe's data can be manifests, folders of audio files, or saved Hugging Face datasets:
each trains on the same examples."""

from __future__ import annotations

import json
import shutil

import pytest

from voxtune.data.manifest import DataError
from voxtune.data.sources import read_source, source_kind
from voxtune.train.trainer import Trainer


def _records(corpus) -> list[dict]:
    return [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]


def _as_folder(corpus, folder):
    """The corpus's training clips as audio files with .txt transcripts and .json sidecars."""
    folder.mkdir()
    for record in _records(corpus):
        stem = folder / record["meta"]["id"]
        shutil.copy(corpus / record["audio"], stem.with_suffix(".wav"))
        stem.with_suffix(".txt").write_text(record["text"])
        fields = {k: v for k, v in record.items() if k not in ("audio", "text", "meta")}
        stem.with_suffix(".json").write_text(json.dumps(fields))
    return folder


def _as_dataset(corpus, folder):
    """The corpus's training clips as a saved Hugging Face dataset, the language column renamed."""
    datasets = pytest.importorskip("datasets")
    records = _records(corpus)
    columns = {
        "audio": [str(corpus / r["audio"]) for r in records],
        "text": [r["text"] for r in records],
        "lang": [r["language"] for r in records],
        "style": [r.get("style") for r in records],
    }
    datasets.Dataset.from_dict(columns).cast_column("audio", datasets.Audio()).save_to_disk(str(folder))
    return folder


def test_each_kind_reads_the_same_clips(corpus, tmp_path):
    manifest = corpus / "train.jsonl"
    folder = _as_folder(corpus, tmp_path / "folder")
    saved = _as_dataset(corpus, tmp_path / "saved")
    assert [source_kind(p) for p in (manifest, folder, saved)] == ["manifest", "folder", "dataset"]
    expected = sorted((e.text, e.language) for e in read_source(manifest))
    assert sorted((e.text, e.language) for e in read_source(folder)) == expected
    assert sorted((e.text, e.language) for e in read_source(saved, columns={"language": "lang"})) == expected
    with pytest.raises(DataError, match="for saved datasets"):
        read_source(folder, split="train")


def test_a_recipe_trains_on_a_folder_and_a_dataset(corpus, tmp_path, tiny_recipe):
    folder = _as_folder(corpus, tmp_path / "folder")
    saved = _as_dataset(corpus, tmp_path / "saved")
    mixed = f"data.train=[{folder}, {{dataset: {saved}, columns: {{language: lang}}}}]"
    trainer = Trainer(tiny_recipe(tmp_path / "run", mixed, "train.max_steps=2"), log=lambda _: None)
    assert len(trainer.train_data) == 2 * len(_records(corpus))
    record = trainer.fit()
    assert record["step"] == 2 and record["loss"] > 0
