"""Speech data that is not a manifest: a folder of audio files with sidecars, and Hugging Face
datasets. Both check their labels with `parse_record`, the manifest's own rules, so the same
labels give the same `SpeechExample`s whichever way they are stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from voxtune.data.example import SpeechExample
from voxtune.data.manifest import (
    FIELDS,
    DataError,
    ManifestError,
    OnError,
    ReadResult,
    RecordError,
    check_audio_file,
    check_on_error,
    collect,
    describe_json,
    parse_record,
)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm")
_DATASETS_MISSING = "reading Hugging Face datasets needs the `datasets` package: pip install voxtune[datasets]"


def read_folder(
    folder: str | os.PathLike,
    *,
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
    on_error: OnError = "raise",
) -> ReadResult:
    """Read a folder of audio files, each with a transcript beside it, into `SpeechExample`s.

    Every file with one of `extensions` (any case) in `folder` and its subfolders is a clip,
    in sorted path order; names starting with "." (hidden files, macOS "._" files) are left
    out. A clip's transcript is the same-stem `.txt` file (UTF-8, stripped; it must exist and
    not be empty). A same-stem `.json` file, when present, holds the clip's other fields as in
    a manifest line (`language`, `segments`, ...; not `audio` or `text`). Two clips with one
    stem (`a.wav`, `a.flac`) are an error, since one sidecar cannot label both. Audio paths come
    back absolute.

    Args:
        folder: the folder to read.
        extensions: the suffixes of audio files.
        on_error: "raise" stops at the first bad clip; "skip" logs a warning, leaves the clip
            out and lists it in `ReadResult.skipped`.

    Raises:
        ManifestError: with on_error="raise", a clip's sidecars are missing or break the schema
            (`path` is the file at fault).
        DataError: `folder` is not a folder, or `on_error` is unknown.
    """
    check_on_error(on_error)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"no such folder: {folder}" if not folder.exists() else f"{folder} is not a folder")
    suffixes = {s.lower() if s.startswith(".") else f".{s.lower()}" for s in extensions}
    return collect(_folder_examples(_audio_files(folder, suffixes)), on_error)


def read_hf_dataset(
    dataset_or_path: Any,
    *,
    audio_column: str = "audio",
    text_column: str | None = "text",
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    on_error: OnError = "raise",
    check_audio: bool = True,
) -> ReadResult:
    """Read a Hugging Face `datasets` dataset into `SpeechExample`s, in row order.

    The audio is not decoded: the audio column is read as stored (`datasets.Audio(decode=False)`),
    and an example's audio is the encoded bytes, or the file path (made absolute) when the
    dataset holds only a path. Every other column is a record field as in a manifest: a
    column named after a field (`language`, `segments`, ...) fills it, `columns` maps a field to
    a column of another name, and the remaining columns go into `meta`.

    Args:
        dataset_or_path: a `datasets.Dataset`, a `datasets.DatasetDict`, or the folder a
            dataset was saved to with `save_to_disk`.
        audio_column: the column holding the audio (an `Audio` feature, or paths or bytes).
        text_column: the column holding the transcript; None for data without transcripts.
        split: the split of a `DatasetDict`; may be left out when it has only one.
        columns: field name -> column name, for the other fields, e.g. {"language": "lang"}.
        on_error: "raise" stops at the first bad row; "skip" logs a warning, leaves the row out
            and lists it in `ReadResult.skipped`.
        check_audio: check that each audio path (where there are no bytes) is an existing file.

    Raises:
        ManifestError: with on_error="raise", a row breaks the schema (the reason starts "row N",
            N counted from 0 as `dataset[N]`).
        DataError: `datasets` is not installed, the dataset cannot be opened, a named column or
            split is missing, the audio column cannot hold audio, or `on_error` is unknown.
    """
    check_on_error(on_error)
    try:
        import datasets
    except ImportError:
        raise DataError(_DATASETS_MISSING) from None
    dataset, label = _open_dataset(datasets, dataset_or_path, split)
    renames = _renames(dataset, label, audio_column, text_column, columns or {})
    if not _holds_audio(datasets, dataset.features[audio_column]):
        feature = dataset.features[audio_column]
        raise DataError(f"{label}: column {audio_column!r} holds {feature!r}, not audio, paths or bytes")
    # Audio(decode=False) hands over {"bytes", "path"}: decoding would need torchcodec.
    dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    return collect(_dataset_examples(dataset, label, audio_column, renames, check_audio), on_error)


def _audio_files(folder: Path, suffixes: set[str]) -> list[Path]:
    found = []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [
            Path(directory, name)
            for name in names
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes
        ]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def _folder_examples(files: list[Path]) -> Iterator[SpeechExample | ManifestError]:
    by_stem: dict[Path, list[Path]] = {}
    for audio in files:
        by_stem.setdefault(audio.with_suffix(""), []).append(audio)
    for audio in files:
        if len(shared := by_stem[audio.with_suffix("")]) > 1:
            names = " and ".join(path.name for path in shared)
            yield ManifestError(audio, None, f"{names} share one stem, so one sidecar cannot label both; rename one")
            continue
        try:
            yield _folder_example(audio)
        except ManifestError as error:
            yield error


def _folder_example(audio: Path) -> SpeechExample:
    transcript = audio.with_suffix(".txt")
    if not transcript.is_file():
        raise ManifestError(audio, None, f"no transcript: {transcript.name} is missing")
    record: dict[str, Any] = {"text": _read_transcript(transcript)}
    sidecar = audio.with_suffix(".json")
    if sidecar.is_file():
        fields = _read_json_sidecar(sidecar)
        if taken := [key for key in ("audio", "text", "transcript") if key in fields]:
            reason = f"{taken[0]!r} does not belong in a sidecar: the clip is {audio.name}, its text {transcript.name}"
            raise ManifestError(sidecar, None, reason)
        record = {**fields, **record}
    try:
        return parse_record(record, audio=Path(os.path.abspath(audio)))
    except RecordError as error:
        raise ManifestError(sidecar, None, str(error)) from None  # the text was checked already


def _read_transcript(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ManifestError(path, None, "the transcript is not valid UTF-8") from None
    except OSError as error:
        raise ManifestError(path, None, f"cannot read the transcript: {error.strerror or error}") from None
    if not text:
        raise ManifestError(path, None, "the transcript is empty")
    return text


def _read_json_sidecar(path: Path) -> dict[str, Any]:
    try:
        fields = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ManifestError(path, None, "the sidecar is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise ManifestError(path, None, f"invalid JSON: {error.msg} (line {error.lineno})") from None
    except OSError as error:
        raise ManifestError(path, None, f"cannot read the sidecar: {error.strerror or error}") from None
    if not isinstance(fields, dict):
        raise ManifestError(path, None, f"the sidecar must hold a JSON object, got {describe_json(fields)}")
    return fields


def _open_dataset(datasets, source: Any, split: str | None) -> tuple[Any, str]:
    """(the `Dataset` to read, how messages name it)."""
    if isinstance(source, (str, os.PathLike)):
        label = str(source)
        if not Path(source).is_dir():
            raise DataError(f"no dataset folder at {label}")
        try:
            source = datasets.load_from_disk(str(source))
        except FileNotFoundError:
            raise DataError(f"{label} is not a dataset saved with save_to_disk") from None
    else:
        label = "dataset"
    if isinstance(source, datasets.DatasetDict):
        names = list(source)
        if split is None and len(names) != 1:
            raise DataError(f"{label} has splits {', '.join(names)}; choose one with split=...")
        split = names[0] if split is None else split
        if split not in source:
            raise DataError(f"{label} has no split {split!r} (splits: {', '.join(names)})")
        return source[split], f"{label}[{split}]"
    if not isinstance(source, datasets.Dataset):
        raise DataError(
            f"cannot read a {type(source).__name__}; give a datasets.Dataset, a DatasetDict, "
            "or the folder of one saved with save_to_disk"
        )
    if split is not None and str(source.split) != split:
        raise DataError(f"split={split!r} given, but {label} is a single dataset, not a DatasetDict")
    return source, label


def _renames(
    dataset, label: str, audio_column: str, text_column: str | None, columns: Mapping[str, str]
) -> dict[str, str]:
    """Column name -> field name, for the columns whose names are not their fields'."""
    present = dataset.column_names
    listed = ", ".join(present)
    if audio_column not in present:
        raise DataError(f"{label} has no audio column {audio_column!r} (columns: {listed})")
    if text_column is not None and text_column not in present:
        raise DataError(
            f"{label} has no text column {text_column!r} (columns: {listed}); name it with "
            "text_column=..., or pass text_column=None for data without transcripts"
        )
    wanted = {**columns, **({"text": text_column} if text_column is not None else {})}
    for name, column in columns.items():
        if name not in FIELDS or name in ("audio", "meta"):
            known = ", ".join(sorted(FIELDS - {"audio", "meta"}))
            raise DataError(f"columns names unknown field {name!r} (known: {known})")
        if name in ("text", "transcript"):
            raise DataError("name the transcript's column with text_column=..., not in columns")
        if column not in present:
            raise DataError(f"{label} has no column {column!r} for {name} (columns: {listed})")
    renames = {column: name for name, column in wanted.items() if column != name}
    for column, name in renames.items():
        if name in present and name not in renames:
            raise DataError(f"{label}: columns {column!r} and {name!r} both give {name}; drop one or rename it")
    return renames


def _holds_audio(datasets, feature: Any) -> bool:
    if isinstance(feature, datasets.Audio):
        return True
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary")


def _dataset_examples(
    dataset, label: str, audio_column: str, renames: dict[str, str], check_audio: bool
) -> Iterator[SpeechExample | ManifestError]:
    for index, row in enumerate(dataset):
        try:
            audio = _row_audio(row[audio_column], check_audio)
            record = {renames.get(column, column): value for column, value in row.items() if column != audio_column}
            if isinstance(record.get("segments"), Mapping):  # a `Sequence` of structs: columns of lists
                record["segments"] = _rows_of(record["segments"])
            yield parse_record(record, audio=audio)
        except RecordError as error:
            yield ManifestError(label, None, f"row {index}: {error}")


def _row_audio(value: Any, check_audio: bool) -> bytes | Path:
    if value is None or (value.get("bytes") is None and not value.get("path")):
        raise RecordError("audio is missing")
    if value.get("bytes") is not None:
        if not value["bytes"]:
            raise RecordError("audio is empty (0 bytes)")
        return value["bytes"]
    path = Path(os.path.abspath(value["path"]))
    if check_audio:
        check_audio_file(path, value["path"])
    return path


def _rows_of(columns: Mapping[str, list]) -> list[dict[str, Any]]:
    """{"start": [0, 1], "end": [1, 2]} -> [{"start": 0, "end": 1}, {"start": 1, "end": 2}]."""
    lengths = {len(values) for values in columns.values() if isinstance(values, list)}
    if len(lengths) != 1 or len(columns) != sum(isinstance(v, list) for v in columns.values()):
        raise RecordError("segments must be a list of objects")
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
