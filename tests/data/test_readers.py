"""Reading speech data: JSONL manifests, folders with sidecars, Hugging Face datasets.

Each test builds a small corpus of real (short) audio files in tmp_path. The Hugging Face tests
need the optional `datasets` package and are skipped without it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxtune.audio import load
from voxtune.data.adapters import read_folder, read_hf_dataset
from voxtune.data.example import Segment, SpeechExample
from voxtune.data.manifest import DataError, ManifestError, ReadResult, read_manifest, write_manifest
from voxtune.errors import InputError

RATE = 16000

# The labels of the shared corpus: relative audio path -> fields (as a manifest line gives them).
CORPUS = {
    "clips/a.wav": {"text": "Hello there.", "language": "en", "style": "happy", "speaker": "amy"},
    "clips/b.flac": {
        "text": "Hola, how are you?",
        "language": "es",
        "intent": "question",
        "segments": [
            {"start": 0.0, "end": 0.1, "language": "es", "text": "Hola"},
            {"start": 0.1, "end": 0.25, "language": "en", "text": "how are you?"},
        ],
    },
    "clips/deep/c.wav": {"text": "What is two plus two?", "instruction": "Answer the question.", "answer": "4"},
}


def write_tone(path: Path, frequency: float, seconds: float = 0.25) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * RATE)) / RATE
    sf.write(path, (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), RATE)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder holding the CORPUS clips (a tone each), their .txt/.json sidecars, and a manifest."""
    root = tmp_path / "corpus"
    lines = []
    for index, (name, fields) in enumerate(CORPUS.items()):
        audio = root / name
        write_tone(audio, 220.0 * (index + 1))
        audio.with_suffix(".txt").write_text(fields["text"] + "\n", encoding="utf-8")
        if others := {k: v for k, v in fields.items() if k != "text"}:
            audio.with_suffix(".json").write_text(json.dumps(others), encoding="utf-8")
        lines.append(json.dumps({"audio": name, **fields}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_lines(path: Path, *lines: str | dict) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def labels(example: SpeechExample) -> SpeechExample:
    """The example without its audio, to compare what different readers say about a clip."""
    return dataclasses.replace(example, audio=None)


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_reads_every_field(tmp_path: Path) -> None:
    write_tone(tmp_path / "data/clips/one.wav", 300)
    elsewhere = tmp_path / "elsewhere/two.wav"
    write_tone(elsewhere, 400)
    full = {
        "audio": "clips/one.wav",
        "transcript": "  Bonjour   ",
        "language": "FR",
        "style": "Calm",
        "intent": "statement",
        "segments": [{"start": 0, "end": 0.1, "language": "fr"}, {"start": 0.1, "end": 0.2, "language": "en_GB"}],
        "instruction": "Translate.",
        "answer": 42,
        "speaker": 1089,
        "corpus": "demo",
        "meta": {"take": 2},
    }
    manifest = write_lines(tmp_path / "data/train.jsonl", full, "", "   ", {"audio": str(elsewhere), "text": "two"})

    result = read_manifest(manifest)

    assert isinstance(result, ReadResult) and result.skipped == [] and len(result) == 2
    first, second = result
    assert first == SpeechExample(
        audio=(tmp_path / "data/clips/one.wav").absolute(),
        text="Bonjour",
        language="fr",
        style="calm",
        intent="statement",
        segments=[Segment(0.0, 0.1, "fr"), Segment(0.1, 0.2, "en-gb")],
        instruction="Translate.",
        answer="42",
        speaker="1089",
        meta={"take": 2, "corpus": "demo"},
    )
    assert second.audio == elsewhere and second.text == "two" and second.language is None
    assert load(first.audio).samples.size == int(0.25 * RATE)


def test_manifest_language_defaults_to_the_first_segment(tmp_path: Path) -> None:
    write_tone(tmp_path / "a.wav", 300)
    segments = [{"start": 0, "end": 0.1, "language": "de"}, {"start": 0.2, "end": 0.3, "language": "en"}]
    manifest = write_lines(tmp_path / "m.jsonl", {"audio": "a.wav", "segments": segments})
    assert read_manifest(manifest)[0].language == "de"


EN_0_1 = {"start": 0, "end": 1, "language": "en"}


def segments(*items: dict) -> dict:
    return {"audio": "a.wav", "segments": list(items)}


BAD_LINES = [
    ('{"audio": "a.wav", "text": }', "invalid JSON: Expecting value"),
    ('["a.wav"]', "a line must be a JSON object, got an array"),
    ({"text": "hi"}, "audio is missing"),
    ({"audio": "  "}, "audio is empty"),
    ({"audio": 7}, "audio must be a path string, got a number (7)"),
    ({"audio": "missing.wav"}, "audio file missing.wav not found (looked for "),
    ({"audio": "sub"}, "audio sub is not a file"),
    ({"audio": "a.wav", "text": 5}, "text must be a string, got a number (5)"),
    ({"audio": "a.wav", "text": "  "}, "text is empty"),
    ({"audio": "a.wav", "text": "a", "transcript": "a"}, "give text or transcript, not both"),
    ('{"audio": "a.wav", "text": "a", "text": "b"}', "key 'text' appears twice"),
    ('{"audio": "a.wav", "answer": NaN}', "invalid JSON: NaN is not a number JSON allows"),
    ({"audio": "a.wav", "language": "english!"}, "language 'english!' is not a language code"),
    ({"audio": "a.wav", "style": "grumpy"}, "unknown style 'grumpy' (choose from neutral, happy"),
    ({"audio": "a.wav", "intent": "wish"}, "unknown intent 'wish' (choose from question, command, statement)"),
    ({"audio": "a.wav", "answer": True}, "answer must be a string or a number, got a boolean (true)"),
    ({"audio": "a.wav", "speaker": 1.5}, "speaker must be a string or a whole number"),
    ({"audio": "a.wav", "meta": [1]}, "meta must be an object, got an array"),
    ({"audio": "a.wav", "take": 1, "meta": {"take": 2}}, "'take' is given both as a field and inside meta"),
    ({"audio": "a.wav", "segments": {}}, "segments must be an array, got an object"),
    ({"audio": "a.wav", "segments": []}, "segments is empty"),
    (segments({"start": 0, "end": 1}), "segments[0].language is missing"),
    (segments({**EN_0_1, "lang": "x"}), "segments[0] has unknown key 'lang'"),
    (segments({**EN_0_1, "start": "0"}), "segments[0].start must be a number"),
    (segments({**EN_0_1, "start": -1}), "segments[0].start (-1.0) is negative"),
    (segments({**EN_0_1, "start": 1}), "segments[0].end (1.0) equals its start"),
    (segments(EN_0_1, {"start": 2.5, "end": 2, "language": "fr"}), "segments[1].end (2.0) is before its start (2.5)"),
    (segments(EN_0_1, {**EN_0_1, "start": 0.5, "end": 2}), "segments[1] (0.5-2.0) overlaps segments[0] (0.0-1.0)"),
    (
        segments({**EN_0_1, "start": 0.5}, {"start": 0, "end": 0.2, "language": "fr"}),
        "segments[1].start (0.0) is before segments[0].start (0.5); sort segments by time",
    ),
]


@pytest.mark.parametrize("line, reason", BAD_LINES, ids=[reason.split(" (")[0][:40] for _, reason in BAD_LINES])
def test_manifest_error_names_the_line(tmp_path: Path, line: str | dict, reason: str) -> None:
    write_tone(tmp_path / "a.wav", 300)
    (tmp_path / "sub").mkdir()
    manifest = write_lines(tmp_path / "m.jsonl", {"audio": "a.wav"}, "", line)

    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)

    assert str(caught.value).startswith(f"{manifest}:3: {reason}")
    assert (caught.value.path, caught.value.line) == (str(manifest), 3)
    assert isinstance(caught.value, InputError)


def test_manifest_error_for_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"audio": "a.wav", "text": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: the line is not valid UTF-8"):
        read_manifest(manifest)


def test_manifest_skip_keeps_the_good_lines_and_reports_the_bad(tmp_path: Path, caplog) -> None:
    for name in ("a.wav", "b.wav"):
        write_tone(tmp_path / name, 300)
    manifest = write_lines(
        tmp_path / "m.jsonl",
        {"audio": "a.wav", "text": "one"},
        "{not json",
        {"audio": "gone.wav", "text": "two"},
        {"audio": "b.wav", "text": "three", "style": "grumpy"},
        {"audio": "b.wav", "text": "four"},
    )

    with caplog.at_level(logging.WARNING, logger="voxtune.data.manifest"):
        result = read_manifest(manifest, on_error="skip")

    assert [x.text for x in result] == ["one", "four"]
    assert [error.line for error in result.skipped] == [2, 3, 4]
    assert [record.getMessage() for record in caplog.records] == [f"skipped {e}" for e in result.skipped]


def test_manifest_without_audio_check_accepts_missing_files(tmp_path: Path) -> None:
    manifest = write_lines(tmp_path / "m.jsonl", {"audio": "later.wav", "text": "hi"})
    assert read_manifest(manifest, check_audio=False)[0].audio == tmp_path / "later.wav"


def test_manifest_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such manifest"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder, not a manifest"):
        read_manifest(tmp_path)
    with pytest.raises(DataError, match="on_error must be 'raise' or 'skip'"):
        read_manifest(tmp_path / "nope.jsonl", on_error="ignore")


def test_manifest_error_pickles() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(ManifestError("m.jsonl", 3, "audio is missing")))
    assert str(error) == "m.jsonl:3: audio is missing"
    assert (error.path, error.line, error.reason) == ("m.jsonl", 3, "audio is missing")


def test_write_manifest_round_trips_with_relative_paths(corpus: Path, tmp_path: Path) -> None:
    examples = read_manifest(corpus / "train.jsonl").examples
    outside = tmp_path / "outside.wav"
    write_tone(outside, 500)
    records = [*examples, {"audio": str(outside), "transcript": "Outside", "id": 7}]

    written = write_manifest(corpus / "copy.jsonl", records)

    lines = [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()]
    assert [line["audio"] for line in lines] == [*CORPUS, str(outside)]
    assert lines[-1] == {"audio": str(outside), "text": "Outside", "meta": {"id": 7}}
    again = read_manifest(written)
    assert again.examples[:3] == examples
    assert labels(again[3]) == SpeechExample(audio=None, text="Outside", meta={"id": 7})
    assert sorted(p.name for p in corpus.iterdir() if p.is_file()) == ["copy.jsonl", "train.jsonl"]  # no temp file


def test_write_manifest_refuses_a_bad_record_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "m.jsonl"
    with pytest.raises(DataError, match=r"record 1: unknown style 'loud'"):
        write_manifest(target, [{"audio": "a.wav"}, {"audio": "b.wav", "style": "loud"}])
    with pytest.raises(DataError, match="record 0: audio must be a file path .* got bytes"):
        write_manifest(target, [SpeechExample(audio=b"RIFF")])
    assert not target.exists()


# --- folders -----------------------------------------------------------------------------------


def test_folder_reads_sidecars_in_nested_folders(corpus: Path) -> None:
    (corpus / ".hidden.wav").write_bytes(b"not audio")
    (corpus / "notes.md").write_text("not a clip")

    result = read_folder(corpus)

    assert [x.audio for x in result] == [(corpus / name).absolute() for name in CORPUS]
    assert result[1].segments == [Segment(0.0, 0.1, "es", "Hola"), Segment(0.1, 0.25, "en", "how are you?")]
    assert result[2].answer == "4" and result[2].text == "What is two plus two?"
    assert [x.audio.name for x in read_folder(corpus, extensions=["FLAC"])] == ["b.flac"]


def test_folder_missing_or_empty_transcript(corpus: Path, caplog) -> None:
    write_tone(corpus / "clips/lonely.wav", 600)
    write_tone(corpus / "clips/blank.wav", 600)
    (corpus / "clips/blank.txt").write_text(" \n", encoding="utf-8")

    with pytest.raises(ManifestError, match=r"blank\.txt: the transcript is empty"):
        read_folder(corpus)
    with caplog.at_level(logging.WARNING, logger="voxtune.data.manifest"):
        result = read_folder(corpus, on_error="skip")

    assert len(result) == 3 and len(caplog.records) == 2
    assert [str(e) for e in result.skipped] == [
        f"{corpus / 'clips/blank.txt'}: the transcript is empty",
        f"{corpus / 'clips/lonely.wav'}: no transcript: lonely.txt is missing",
    ]


@pytest.mark.parametrize(
    "sidecar, reason",
    [
        ({"style": "grumpy"}, "unknown style 'grumpy'"),
        ({"text": "again"}, "'text' does not belong in a sidecar"),
        ([1, 2], "the sidecar must hold a JSON object, got an array"),
        ("{oops", "invalid JSON: Expecting property name"),
    ],
)
def test_folder_json_sidecar_errors(tmp_path: Path, sidecar, reason: str) -> None:
    write_tone(tmp_path / "x.wav", 300)
    (tmp_path / "x.txt").write_text("words", encoding="utf-8")
    text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
    (tmp_path / "x.json").write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as caught:
        read_folder(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'x.json'}: {reason}")


def test_folder_two_clips_with_one_stem(tmp_path: Path) -> None:
    write_tone(tmp_path / "x.wav", 300)
    write_tone(tmp_path / "x.flac", 300)
    (tmp_path / "x.txt").write_text("words", encoding="utf-8")
    with pytest.raises(ManifestError, match="x.flac and x.wav share one stem"):
        read_folder(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        read_folder(tmp_path / "nope")


# --- Hugging Face datasets ---------------------------------------------------------------------


def hf_dataset(corpus: Path, *, as_bytes: bool = False):
    """The CORPUS as an in-memory dataset with an Audio column; language in a column named "lang"."""
    datasets = pytest.importorskip("datasets")
    paths = [str(corpus / name) for name in CORPUS]
    columns = {
        "audio": [Path(p).read_bytes() for p in paths] if as_bytes else paths,
        "text": [fields["text"] for fields in CORPUS.values()],
        "lang": [fields.get("language") for fields in CORPUS.values()],
    }
    for name in ("style", "intent", "segments", "instruction", "answer", "speaker"):
        columns[name] = [fields.get(name) for fields in CORPUS.values()]
    return datasets.Dataset.from_dict(columns).cast_column("audio", datasets.Audio())


def test_hf_dataset_in_memory_with_paths_and_with_bytes(corpus: Path) -> None:
    by_path = read_hf_dataset(hf_dataset(corpus), columns={"language": "lang"})
    by_bytes = read_hf_dataset(hf_dataset(corpus, as_bytes=True), columns={"language": "lang"})

    assert [x.audio for x in by_path] == [corpus / name for name in CORPUS]
    assert all(isinstance(x.audio, bytes) for x in by_bytes)
    assert [labels(x) for x in by_bytes] == [labels(x) for x in by_path]
    assert by_path[1].segments[1] == Segment(0.1, 0.25, "en", "how are you?")
    # Without the mapping, "lang" is just another column.
    assert read_hf_dataset(hf_dataset(corpus))[0].meta == {"lang": "en"}


def test_hf_dataset_saved_to_disk(corpus: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dataset = hf_dataset(corpus)
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(tmp_path / "saved")

    train = read_hf_dataset(tmp_path / "saved", split="train", columns={"language": "lang"})
    test = read_hf_dataset(str(tmp_path / "saved"), split="test", columns={"language": "lang"})

    assert [labels(x) for x in train] == [labels(x) for x in read_hf_dataset(dataset, columns={"language": "lang"})]
    assert len(test) == 1
    with pytest.raises(DataError, match="has splits train, test; choose one with split="):
        read_hf_dataset(tmp_path / "saved")


def test_hf_dataset_with_path_strings_and_a_sequence_of_segments(corpus: Path) -> None:
    datasets = pytest.importorskip("datasets")
    seconds, code = datasets.Value("float64"), datasets.Value("string")
    segment = {"start": seconds, "end": seconds, "language": code}
    features = datasets.Features({"audio": datasets.Value("string"), "segments": datasets.Sequence(segment)})
    # A `Sequence` of structs is stored, and read back, as a struct of lists.
    segments = {"start": [0, 0.1], "end": [0.1, 0.2], "language": ["es", "en"]}
    rows = {"audio": [str(corpus / "clips/b.flac")], "segments": [segments]}
    dataset = datasets.Dataset.from_dict(rows, features=features)

    (example,) = read_hf_dataset(dataset, text_column=None)

    assert example == SpeechExample(
        audio=corpus / "clips/b.flac", language="es", segments=[Segment(0.0, 0.1, "es"), Segment(0.1, 0.2, "en")]
    )


def test_hf_dataset_errors(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    dataset = hf_dataset(corpus)
    with pytest.raises(DataError, match=r"dataset has no text column 'words' \(columns: audio, text, lang"):
        read_hf_dataset(dataset, text_column="words")
    with pytest.raises(DataError, match="dataset has no column 'language' for language"):
        read_hf_dataset(dataset, columns={"language": "language"})
    with pytest.raises(DataError, match="columns names unknown field 'lang'"):
        read_hf_dataset(dataset, columns={"lang": "lang"})
    with pytest.raises(DataError, match="column 'text' holds"):
        read_hf_dataset(datasets.Dataset.from_dict({"text": [1]}), audio_column="text", text_column=None)
    with pytest.raises(DataError, match="no dataset folder at"):
        read_hf_dataset(tmp_path / "nothing")

    bad = dataset.map(lambda row: {"style": "grumpy" if row["text"].startswith("What") else row["style"]})
    with pytest.raises(ManifestError, match=r"^dataset: row 2: unknown style 'grumpy'"):
        read_hf_dataset(bad, columns={"language": "lang"})
    assert len(read_hf_dataset(bad, columns={"language": "lang"}, on_error="skip")) == 2

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install voxtune\[datasets\]"):
        read_hf_dataset(dataset)


# --- every reader alike ------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["folder", "hf paths", "hf bytes", "hf saved"])
def test_every_reader_gives_the_manifests_examples(corpus: Path, tmp_path: Path, reader: str) -> None:
    from_manifest = read_manifest(corpus / "train.jsonl")
    if reader == "folder":
        other = read_folder(corpus)
        assert other.examples == from_manifest.examples  # audio paths included
    elif reader == "hf saved":
        hf_dataset(corpus).save_to_disk(tmp_path / "saved")  # save_to_disk stores the files' bytes
        other = read_hf_dataset(tmp_path / "saved", columns={"language": "lang"})
    else:
        other = read_hf_dataset(hf_dataset(corpus, as_bytes=reader == "hf bytes"), columns={"language": "lang"})

    assert [labels(x) for x in other] == [labels(x) for x in from_manifest]
    for mine, theirs in zip(other, from_manifest, strict=True):
        np.testing.assert_array_equal(load(mine.audio).samples, load(theirs.audio).samples)
