"""File writing that never leaves a half-written file behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from voxtune.errors import InputError, shorten


class WriteError(InputError):
    """A write that failed: a full disk, a file-size limit, no permission."""


@contextmanager
def reported_writes(what: str) -> Iterator[None]:
    """Turn a failed write inside the block into a one-line `WriteError` about `what`: an
    OSError, or what the serialisers raise for one (safetensors' SafetensorError, torch.save's
    RuntimeError). Keep the block to writes: any RuntimeError in it is read as one."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as error:
        raise WriteError(f"cannot write {what}: {error.strerror or error}") from None
    except (SafetensorError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise WriteError(f"cannot write {what}: {shorten(reason)}") from None


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    A reader (or a crash) sees either the old file or the whole new one, never a torn write.
    Missing parent folders are created. A symlink is followed (its target is replaced, the
    link kept); the file gets the old file's permissions, or the usual ones for a new file.
    A device or pipe (e.g. /dev/null) is written to directly, since it cannot be replaced.
    """
    path = Path(os.path.realpath(path))
    existing = path.stat() if path.exists() else None
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        with open(path, "wb") as f:
            f.write(data)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".vt-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), stat.S_IMODE(existing.st_mode) if existing else _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Fill a staging folder (yielded) that replaces `target` whole when the block succeeds.

    Readers see the old folder or the complete new one, never a mix; a crash or an exception
    leaves the old one in place and removes the staging folder. Files are fsynced before the
    rename. The caller decides whether `target` may be replaced at all.
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would make the folder private
        yield staging
        for file in staging.rglob("*"):  # durable before the rename makes them visible
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    try:
        os.replace(target, retired / target.name)
        os.replace(staging, target)
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_file_mode() -> int:
    """0o666 less the process umask, what open() would give a new file."""
    return 0o666 & ~_umask()


class LogError(InputError):
    """A JSONL log is damaged before its last line."""


def read_log(path: str | os.PathLike, *, damaged_ok: bool = False) -> list[dict[str, Any]]:
    """The records of an append-only JSONL log, one object per line; none if it is missing.

    A last line cut short (the writer killed mid-line) is dropped; a bad line before it is a
    `LogError`, since something other than a kill damaged the log, unless `damaged_ok` (then
    every bad line is skipped: for a reader that only reports on the log).
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) or damaged_ok:
                continue  # torn by a kill, or skipped on request
            raise LogError(f"{path}: line {number} is not JSON ({error.msg}); the log is damaged") from None
    return records
