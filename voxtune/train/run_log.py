"""A training run's log: one JSON record per logged step in `<output>/log.jsonl` (the record a
resume trusts), the same numbers as TensorBoard scalars in `<output>/tensorboard`, and a line on
the console every few steps."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from voxtune.files import read_log, write_atomic

LOG_FILE = "log.jsonl"
TENSORBOARD = "tensorboard"  # event files: tensorboard --logdir <output>/tensorboard
FLUSH_SECONDS = 10.0  # TensorBoard's writer works in the background: flushed this often


class RunLog:
    """The log of the run in `out`; `say` prints a console line. Only one process writes it."""

    def __init__(self, out: Path, say: Callable[[str], None]) -> None:
        self.out, self.say = out, say
        self._board: Any = None  # the TensorBoard writer, opened with the first record
        self._flushed = 0.0  # when it last flushed (time.monotonic)
        self._replay: list[dict[str, Any]] | None = None  # after a resume: the records TensorBoard gets again

    def write(self, record: dict[str, Any], *, every: int) -> None:
        """Append `record` (it has a "step"); print it when its step is a multiple of `every`."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOG_FILE, "a+b") as file:
            # A line an earlier run's kill cut short gets its end, so this record has a line of its own.
            torn = file.seek(0, 2) > 0 and file.seek(-1, 2) >= 0 and file.read(1) != b"\n"
            file.write(("\n" if torn else "").encode() + json.dumps(record).encode() + b"\n")
        if self._board is None:
            from tensorboardX import SummaryWriter

            self._board = SummaryWriter(str(self.out / TENSORBOARD), purge_step=0 if self._replay is not None else None)
            for earlier in self._replay or []:
                self._scalars(earlier)
            self._replay = None
        self._scalars(record)
        if time.monotonic() - self._flushed > FLUSH_SECONDS or "eval_loss" in record:
            self._board.flush()
            self._flushed = time.monotonic()
        if record["step"] % every == 0:
            self.say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far (lines torn by kills left out)."""
        return read_log(self.out / LOG_FILE, damaged_ok=True)

    def forget_after(self, step: int) -> None:
        """Drop the records of steps past `step` (a resumed run does them again) and a line
        torn by the kill. TensorBoard's events go too: the JSONL log is the record, so the next
        event file purges every earlier event and starts with the kept records again (the kill
        may have caught TensorBoard's background writer with events still queued)."""
        log = self.out / LOG_FILE
        self._replay = [record for record in read_log(log) if record.get("step", 0) <= step]
        if log.exists():
            write_atomic(log, "".join(json.dumps(record) + "\n" for record in self._replay).encode())

    def close(self) -> None:
        """Finish TensorBoard's file now (its writer works in the background)."""
        if self._board is not None:
            self._board.close()
            self._board = None

    def _scalars(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._board.add_scalar(key, value, record["step"])
