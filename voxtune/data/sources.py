"""Where a recipe's data comes from: a JSONL manifest, a folder of audio files with
transcripts beside them, or a Hugging Face dataset saved with `save_to_disk`.

    read_source("data/train.jsonl")                      # a manifest
    read_source("recordings/")                           # a.wav + a.txt (+ a.json), ...
    read_source("hf-saved/", split="train", columns={"language": "lang"})  # datasets
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from voxtune.data.adapters import read_folder, read_hf_dataset
from voxtune.data.manifest import DataError, ReadResult, read_manifest

# The files `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write into a folder.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def source_kind(path: str | os.PathLike) -> str:
    """ "manifest", "dataset" (a saved Hugging Face dataset) or "folder" (audio files)."""
    path = Path(path)
    if not path.is_dir():
        return "manifest"
    return "dataset" if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS) else "folder"


def read_source(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    audio_column: str = "audio",
    text_column: str | None = "text",
    columns: Mapping[str, str] | None = None,
) -> ReadResult:
    """The examples at `path`, whichever of the three kinds it is (`source_kind`). The other
    arguments are for datasets only (see `voxtune.data.adapters.read_hf_dataset`).

    Raises:
        DataError: a manifest or folder is missing, a dataset-only argument is given for
            another kind, or `datasets` is not installed for a dataset.
    """
    kind = source_kind(path)
    dataset_options = split is not None or audio_column != "audio" or text_column != "text" or columns
    if kind != "dataset" and dataset_options:
        raise DataError(
            f"{path}: split, audio_column, text_column and columns are for saved datasets, and this is a {kind}"
        )
    if kind == "manifest":
        return read_manifest(path)
    if kind == "folder":
        return read_folder(path)
    return read_hf_dataset(str(path), split=split, audio_column=audio_column, text_column=text_column, columns=columns)
