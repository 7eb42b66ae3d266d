"""voxtune.files.write_atomic: the old file survives a failed write, no temporary file is left."""

from __future__ import annotations

import pytest

from voxtune.files import write_atomic


def test_write_creates_folders_and_replaces(tmp_path):
    path = write_atomic(tmp_path / "a" / "b" / "out.bin", b"first")
    assert path.read_bytes() == b"first"
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_atomic(tmp_path / "out.bin", b"good")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
