"""JSONL manifests, and the record schema every reader of speech data checks.

A manifest is UTF-8 JSON Lines, one example per line; blank lines are ignored (JSON has no
comments, so neither does a manifest):

    {"audio": "clips/0001.wav", "text": "Hello there.", "language": "en", "style": "happy"}

Fields (all but `audio` optional; `null` counts as absent):
    audio: the audio file, relative to the manifest's folder or absolute.
    text (alias transcript): the words spoken; surrounding whitespace is dropped.
    language: a language code ("en", "pt-BR"); lower-cased, "_" read as "-". Filled from the
        first segment's language when absent.
    style: neutral, happy, sad, angry, calm, excited or whisper.
    intent: question, command or statement.
    segments: [{"start": 0.0, "end": 1.2, "language": "en", "text": "..."}, ...], times in
        seconds (>= 0), each ending after it starts, sorted and not overlapping; text optional.
    instruction, answer (a string or a number), speaker (a string or a whole number).
    meta: an object, kept as it is; any other key goes into `meta` too.

`parse_record` holds these rules; the folder and Hugging Face readers (voxtune.data.adapters)
use it too, so every source gives the same `SpeechExample` for the same labels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from voxtune.audio.voices import STYLES
from voxtune.data.example import Segment, SpeechExample
from voxtune.errors import InputError
from voxtune.files import write_atomic
from voxtune.tags import INTENTS

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

FIELDS = frozenset(
    {
        "audio",
        "text",
        "transcript",
        "language",
        "style",
        "intent",
        "segments",
        "instruction",
        "answer",
        "speaker",
        "meta",
    }
)
_SEGMENT_KEYS = ("start", "end", "language", "text")
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{1,8})*")
_BOM = b"\xef\xbb\xbf"


class DataError(InputError):
    """Speech data cannot be read: a missing file or folder, a missing package, a bad record."""


class RecordError(DataError):
    """One record breaks the schema. The message is the reason alone; readers re-raise it as a
    `ManifestError` that says where the record is."""


class ManifestError(DataError):
    """A record of a manifest (or a sidecar file, or a dataset row) breaks the schema.

    Attributes:
        path: the file (or dataset) that holds the record, as the caller named it.
        line: the record's line number (from 1) in a manifest; None for a whole file or a row.
        reason: what is wrong, without the location.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep it picklable (e.g. across worker processes)
        return type(self), (self.path, self.line, self.reason)


@dataclass(frozen=True)
class ReadResult(Sequence[SpeechExample]):
    """What a reader returns: the examples read, and the records skipped with `on_error="skip"`.

    It is a sequence of its examples: `len(result)`, `result[0]` and `for x in result` work on
    `examples` directly.
    """

    examples: list[SpeechExample]
    skipped: list[ManifestError] = field(default_factory=list)

    def __getitem__(self, index):
        return self.examples[index]

    def __len__(self) -> int:
        return len(self.examples)


def read_manifest(path: str | os.PathLike, *, on_error: OnError = "raise", check_audio: bool = True) -> ReadResult:
    """Read a JSONL manifest into `SpeechExample`s, in file order.

    Audio paths come back absolute (a relative one is resolved against the manifest's folder).
    Segments are not checked against the clip's length: that needs each file opened, which is
    too slow for a large corpus; the audio is first decoded when it is used.

    Args:
        path: the manifest file.
        on_error: "raise" stops at the first bad line; "skip" logs a warning for each bad line,
            leaves it out, and lists it in `ReadResult.skipped`.
        check_audio: check that each audio file exists (it is not opened).

    Returns:
        The examples, and the lines skipped.

    Raises:
        ManifestError: with on_error="raise", a line breaks the schema (the message starts
            "path:line:").
        DataError: the manifest cannot be read, or `on_error` is unknown.
    """
    check_on_error(on_error)
    path = Path(path)
    base = Path(os.path.abspath(path.parent))
    try:
        with path.open("rb") as lines:
            return collect(_manifest_examples(lines, path, base, check_audio), on_error)
    except FileNotFoundError:
        raise DataError(f"no such manifest: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a manifest") from None
    except PermissionError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None


def write_manifest(path: str | os.PathLike, records: Iterable[SpeechExample | Mapping[str, Any]]) -> Path:
    """Write examples (or manifest records as dicts) as a JSONL manifest, atomically.

    Every record is checked with the rules `read_manifest` applies, so what is written reads
    back, and written in its canonical form (`transcript` as `text`, codes lower-cased, other
    keys under `meta`). Audio must be a path. A relative path is taken as relative to the
    manifest's folder (the manifest's own convention) and written as it is; an absolute path
    inside that folder is written relative to it, any other absolute path as it is. Audio
    files are not checked: they may be written after the manifest.

    Returns:
        The manifest's path (a symlink's target).

    Raises:
        DataError: a record breaks the schema, has no audio path, or holds a value JSON cannot
            hold; nothing is written then.
    """
    path = Path(path)
    base = Path(os.path.abspath(path.parent))
    lines = []
    for index, record in enumerate(records):
        try:
            lines.append(_manifest_line(record, base))
        except RecordError as error:
            raise DataError(f"cannot write {path}: record {index}: {error}") from None
    return write_atomic(path, "".join(lines).encode("utf-8"))


def parse_record(record: Mapping[str, Any], *, audio: str | Path | bytes) -> SpeechExample:
    """Check one record's fields and build its example; the caller has resolved `audio`.

    The record's own "audio" key, if any, is ignored. None values count as absent.

    Raises:
        RecordError: naming the field and what is wrong with it.
    """
    fields = {k: v for k, v in record.items() if v is not None and k != "audio"}
    if "text" in fields and "transcript" in fields:
        raise RecordError("give text or transcript, not both")
    text_key = "transcript" if "transcript" in fields else "text"
    meta = _meta(fields)
    segments = _segments(fields["segments"]) if "segments" in fields else None
    language = _language(fields["language"], "language") if "language" in fields else None
    if language is None and segments:
        language = segments[0].language
    return SpeechExample(
        audio=audio,
        text=_optional(fields, text_key, _text),
        language=language,
        style=_optional(fields, "style", lambda v, name: _choice(v, name, tuple(STYLES))),
        intent=_optional(fields, "intent", lambda v, name: _choice(v, name, INTENTS)),
        segments=segments,
        instruction=_optional(fields, "instruction", _text),
        answer=_optional(fields, "answer", _answer),
        speaker=_optional(fields, "speaker", _speaker),
        meta=meta,
    )


def check_on_error(on_error: str) -> None:
    """Raise `DataError` unless `on_error` is "raise" or "skip"."""
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def collect(results: Iterable[SpeechExample | ManifestError], on_error: OnError) -> ReadResult:
    """Gather a reader's examples; a `ManifestError` among them is raised, or logged and kept
    in `skipped`, as `on_error` says."""
    examples, skipped = [], []
    for item in results:
        if not isinstance(item, ManifestError):
            examples.append(item)
        elif on_error == "raise":
            raise item
        else:
            logger.warning("skipped %s", item)
            skipped.append(item)
    return ReadResult(examples, skipped)


def check_audio_file(path: Path, shown: str) -> None:
    """Raise `RecordError` unless `path` is an existing file (`shown` is the name the record gave)."""
    if not path.exists():
        looked = "" if shown == str(path) else f" (looked for {path})"
        raise RecordError(f"audio file {shown} not found{looked}")
    if not path.is_file():
        raise RecordError(f"audio {shown} is not a file")


def describe_json(value: Any) -> str:
    """What a value is, in JSON's words, for messages: "a number (5)", "an array"."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return f"a {type(value).__name__}"


def _manifest_examples(lines: BinaryIO, path: Path, base: Path, check_audio: bool) -> Iterator:
    """Each line's example, or a `ManifestError` for a bad one; blank lines yield nothing."""
    for number, raw in enumerate(lines, start=1):
        try:
            example = _parse_line(raw.removeprefix(_BOM) if number == 1 else raw, base, check_audio)
        except RecordError as error:
            yield ManifestError(path, number, str(error))
            continue
        if example is not None:
            yield example


def _parse_line(raw: bytes, base: Path, check_audio: bool) -> SpeechExample | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError("the line is not valid UTF-8") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line, object_pairs_hook=_object_without_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise RecordError(f"invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(record, dict):
        raise RecordError(f"a line must be a JSON object, got {describe_json(record)}")
    shown, audio = _audio_path(record.get("audio"), base)
    example = parse_record(record, audio=audio)
    if check_audio:
        check_audio_file(audio, shown)
    return example


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = {}
    for key, value in pairs:
        if key in record:
            raise RecordError(f"key {key!r} appears twice")
        record[key] = value
    return record


def _no_constant(name: str) -> None:
    raise RecordError(f"invalid JSON: {name} is not a number JSON allows")


def _audio_path(value: Any, base: Path) -> tuple[str, Path]:
    """(the path as written, the absolute path) of a manifest's audio field."""
    if value is None:
        raise RecordError("audio is missing")
    if not isinstance(value, str):
        raise RecordError(f"audio must be a path string, got {describe_json(value)}")
    if not value.strip():
        raise RecordError("audio is empty")
    return value, Path(os.path.abspath(base / value))  # an absolute `value` replaces `base`


def _manifest_line(record: SpeechExample | Mapping[str, Any], base: Path) -> str:
    audio: object  # checked below: a file path is what goes in a manifest
    if isinstance(record, SpeechExample):
        audio, record = record.audio, record.to_record("")
    elif isinstance(record, Mapping):
        audio = record.get("audio")
    else:
        raise RecordError(f"expected a SpeechExample or a dict, got {type(record).__name__}")
    if isinstance(audio, (bytes, bytearray)) or not isinstance(audio, (str, os.PathLike)):
        kind = "bytes" if isinstance(audio, (bytes, bytearray)) else type(audio).__name__
        raise RecordError(f"audio must be a file path to go in a manifest, got {kind}; write the audio to a file first")
    if not str(audio).strip():
        raise RecordError("audio is empty")
    path = Path(audio)
    example = parse_record(record, audio=path)
    try:
        return json.dumps(example.to_record(_relative(path, base)), ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise RecordError(f"a value cannot be written as JSON: {error}") from None


def _relative(audio: Path, base: Path) -> str:
    if not audio.is_absolute():
        return audio.as_posix()
    try:
        return Path(os.path.abspath(audio)).relative_to(base).as_posix()
    except ValueError:
        return str(audio)


def _optional(fields: Mapping[str, Any], name: str, parse) -> Any:
    return parse(fields[name], name) if name in fields else None


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{name} must be a string, got {describe_json(value)}")
    text = value.strip()
    if not text:
        raise RecordError(f"{name} is empty; leave the field out instead")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(f"{name} holds an unpaired surrogate (\\ud800-\\udfff), not text") from None
    return text


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{name} must be a string, got {describe_json(value)}")
    choice = value.strip().lower()
    if choice not in choices:
        raise RecordError(f"unknown {name} {value!r} (choose from {', '.join(choices)})")
    return choice


def _language(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{name} must be a language code string, got {describe_json(value)}")
    code = value.strip().lower().replace("_", "-")
    if not _LANGUAGE_CODE.fullmatch(code):
        raise RecordError(f"{name} {value!r} is not a language code such as 'en' or 'pt-br'")
    return code


def _answer(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(f"{name} must be a string or a number, got {describe_json(value)}")
    if isinstance(value, str):
        return _text(value, name)
    if not math.isfinite(value):
        raise RecordError(f"{name} must be finite, got {value!r}")
    return str(value)


def _speaker(value: Any, name: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RecordError(f"{name} must be a string or a whole number, got {describe_json(value)}")
    return _text(value, name)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{name} must be a number of seconds, got {describe_json(value)}")
    if not math.isfinite(value):
        raise RecordError(f"{name} must be finite, got {value!r}")
    return float(value)


def _meta(fields: dict[str, Any]) -> dict[str, Any]:
    """The record's `meta` object, with every key the schema does not know merged in."""
    given = fields.get("meta", {})
    if not isinstance(given, Mapping):
        raise RecordError(f"meta must be an object, got {describe_json(given)}")
    meta = dict(given)
    for key, value in fields.items():
        if key in FIELDS:
            continue
        if key in meta:
            raise RecordError(f"{key!r} is given both as a field and inside meta")
        meta[key] = value
    return meta


def _segments(value: Any) -> list[Segment]:
    if not isinstance(value, (list, tuple)):
        raise RecordError(f"segments must be an array, got {describe_json(value)}")
    if not value:
        raise RecordError("segments is empty; leave the field out instead")
    segments: list[Segment] = []
    for index, item in enumerate(value):
        segment = _segment(item, f"segments[{index}]")
        if segments:
            _check_order(segments[-1], segment, index)
        segments.append(segment)
    return segments


def _segment(item: Any, name: str) -> Segment:
    if not isinstance(item, Mapping):
        raise RecordError(f"{name} must be an object, got {describe_json(item)}")
    item = {k: v for k, v in item.items() if v is not None}
    if unknown := [k for k in item if k not in _SEGMENT_KEYS]:
        raise RecordError(f"{name} has unknown key {unknown[0]!r} (known: {', '.join(_SEGMENT_KEYS)})")
    for key in ("start", "end", "language"):
        if key not in item:
            raise RecordError(f"{name}.{key} is missing")
    start, end = _number(item["start"], f"{name}.start"), _number(item["end"], f"{name}.end")
    if start < 0:
        raise RecordError(f"{name}.start ({start!r}) is negative")
    if end < start:
        raise RecordError(f"{name}.end ({end!r}) is before its start ({start!r})")
    if end == start:
        raise RecordError(f"{name}.end ({end!r}) equals its start: the segment is empty")
    text = item.get("text", "")
    if not isinstance(text, str):
        raise RecordError(f"{name}.text must be a string, got {describe_json(text)}")
    return Segment(start, end, _language(item["language"], f"{name}.language"), text.strip())


def _check_order(previous: Segment, segment: Segment, index: int) -> None:
    if segment.start < previous.start:
        raise RecordError(
            f"segments[{index}].start ({segment.start!r}) is before segments[{index - 1}].start "
            f"({previous.start!r}); sort segments by time"
        )
    if segment.start < previous.end:
        raise RecordError(
            f"segments[{index}] ({segment.start!r}-{segment.end!r}) overlaps segments[{index - 1}] "
            f"({previous.start!r}-{previous.end!r})"
        )
