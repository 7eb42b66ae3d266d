"""From the engine's thread to the event loop: a generation's events as an asyncio queue, and
waiting that notices a client who went away or a server that stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request

from voxtune.infer.engine import Completion, Engine, Generation
from voxtune.model.generation import SamplingParams


class ClientGone(Exception):
    """The client disconnected; its generations were cancelled."""


class ShuttingDown(Exception):
    """The server is stopping and its drain time is up; the generation was cancelled."""


class Drain:
    """When a stopping server cuts what still runs: `begin(seconds)` sets `cut` a moment before
    the server's own deadline, so that cut streams still send their error event and [DONE]."""

    def __init__(self) -> None:
        self._cut: asyncio.Event | None = None

    @property
    def cut(self) -> asyncio.Event:
        if self._cut is None:  # made on the server's loop, at first use
            self._cut = asyncio.Event()
        return self._cut

    def begin(self, seconds: float) -> None:
        """The server stops in `seconds`: cut running work a little before (at most 1 s)."""
        margin = min(1.0, seconds / 4)
        asyncio.get_running_loop().call_later(seconds - margin, self.cut.set)


class Pending:
    """A submitted generation whose events arrive on `queue` as (kind, value)."""

    def __init__(self, engine: Engine, messages: Any, params: SamplingParams, drain: Drain | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.drain = drain
        self.queue: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop has closed (server shutting down)
                pass

        self.generation: Generation = engine.submit(messages, params, sink)
        self._checked = time.monotonic()  # when the client was last seen connected

    def cancel(self) -> None:
        """Stop the generation."""
        self.generation.cancel()

    async def next(self, request: Request | None = None, poll: float = 0.25) -> tuple[str, Any]:
        """The next event; with `request`, every `poll` seconds check that its client is still
        there, else cancel and raise `ClientGone`; when the drain cuts, cancel and raise
        `ShuttingDown`."""
        watching = request is not None or self.drain is not None
        while True:
            if self.drain is not None and self.drain.cut.is_set():
                self.cancel()
                raise ShuttingDown
            if request is not None and time.monotonic() - self._checked >= poll:
                self._checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    raise ClientGone
            try:
                return await asyncio.wait_for(self.queue.get(), poll if watching else None)
            except TimeoutError:
                continue

    async def result(self, request: Request | None = None) -> Completion:
        """Wait for the whole reply (pieces are skipped)."""
        while True:
            kind, value = await self.next(request)
            if kind == "done":
                return value
            if kind == "error":
                raise value


def cancel_all(pending: Sequence[Pending]) -> None:
    """Cancel every generation in `pending`."""
    for item in pending:
        item.cancel()
