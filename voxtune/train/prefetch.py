"""Run an iterator ahead in a background thread, so the next batches are ready when asked for.

Reading audio, tokenising and collating release the GIL for much of their time (file reads,
the Rust tokenizer, torch ops), so they overlap with the training step on the main thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    """An exception raised in the worker, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterator[T], depth: int) -> Generator[T, None, None]:
    """Yield what `items` yields, computed up to `depth` items ahead in a daemon thread.

    An exception in `items` is raised here, at the item where it happened. Closing the returned
    generator (or dropping it) stops the worker. `depth=0` yields from `items` directly.
    """
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # noqa: BLE001  (handed to the consumer, which re-raises it)
            put(_Failure(error))

    worker = threading.Thread(target=work, name="voxtune-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()
