"""voxtune.files: write_atomic (the old file survives a failed write, no temporary file is left) and read_log."""

from __future__ import annotations

import os
import stat
import threading

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


def test_permissions_symlinks_and_long_names(tmp_path):
    existing = tmp_path / "shared.wav"
    existing.write_bytes(b"old")
    existing.chmod(0o644)
    write_atomic(existing, b"new")
    assert existing.stat().st_mode & 0o777 == 0o644

    umask = os.umask(0o022)
    try:
        fresh = write_atomic(tmp_path / "fresh.wav", b"x")
    finally:
        os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o644  # what open() gives, not mkstemp's 0600

    target = tmp_path / "target.wav"
    target.write_bytes(b"old")
    link = tmp_path / "link.wav"
    link.symlink_to(target)
    write_atomic(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"

    long_name = tmp_path / ("n" * 250)
    assert write_atomic(long_name, b"ok").read_bytes() == b"ok"


def test_a_pipe_is_written_to_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_atomic(fifo, b"through the pipe")
    reader.join(timeout=10)
    assert received == [b"through the pipe"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_log_s_torn_last_line_is_dropped_and_damage_before_it_is_an_error(tmp_path):
    from voxtune.files import LogError, read_log

    log = tmp_path / "log.jsonl"
    assert read_log(log) == []
    log.write_text('{"step": 1}\n{"step": 2}\n{"ste')  # killed mid-line
    assert read_log(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(LogError, match="line 2"):
        read_log(log)
    assert read_log(log, damaged_ok=True) == [{"step": 1}, {"step": 3}]  # a reader that only reports
