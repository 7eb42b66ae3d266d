"""The gate every API request passes: authentication, the body-size limit, the concurrency
limits (the server's and each caller's) and the write timeout, as one ASGI middleware (so the
limits hold for streamed responses to their end).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxtune.serve.errors import APIError

OPEN_PATHS = ("/", "/health", "/metrics", "/openapi.json")  # answered without a key (/ is the playground page)
INSECURE_KEY = "openai-insecure-api-key."  # the WebSocket subprotocol that carries a browser's key


def owner_of(key: str | None) -> str:
    """The owner name stored with a caller's audio: a hash of its key ("" without keys)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24] if key else ""


@dataclass
class GateStats:
    """What the gate counts, for /metrics."""

    in_flight: int = 0
    rejected: int = 0  # requests turned away with 429
    responses: dict[tuple[str, int], int] = field(default_factory=dict)  # (path, status) -> count


class WriteTimeout(Exception):
    """The client stopped reading its response."""


class Gate:
    """ASGI middleware: checks the bearer key, buffers the body up to `max_body` bytes (413
    beyond), admits at most `max_concurrent` requests at once and `per_client` from one caller
    (an API key, or an address without keys; 429 beyond), and abandons a response the client
    has not read for `write_timeout` seconds."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Sequence[str],
        max_body: int,
        max_concurrent: int,
        stats: GateStats,
        paths: Sequence[str] = (),
        body_timeout: float = 30.0,
        per_client: int | None = None,
        write_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.body_timeout = body_timeout  # a stalled upload must not hold a slot for ever
        self.write_timeout = write_timeout  # nor a client that never reads its stream
        self.paths = frozenset(paths)  # counted by name in /metrics
        self.api_keys = [key.encode() for key in api_keys]
        self.max_body = max_body
        self.max_concurrent = max_concurrent
        self.per_client = per_client or max_concurrent
        self.by_client: dict[str, int] = {}  # requests in flight per caller
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        path = scope["path"] if scope["path"] in self.paths else "other"  # unknown paths: one series
        if path == "other" and scope["path"].startswith("/v1/models/"):
            path = "/v1/models/{model}"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                key = (path, message["status"])
                self.stats.responses[key] = self.stats.responses.get(key, 0) + 1
            await send(message)

        if scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, counted)
        else:
            await self._guarded(scope, receive, counted)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            key = self._authenticate(scope)
        except APIError as error:
            await error.response()(scope, receive, send)
            return
        client = owner_of(key) if key else "address:" + (scope.get("client") or ("", 0))[0]
        busy = None
        if self.stats.in_flight >= self.max_concurrent:
            busy = f"the server is handling {self.max_concurrent} requests, its limit; retry shortly"
        elif self.by_client.get(client, 0) >= self.per_client:
            busy = f"you have {self.per_client} requests in flight, the limit for one caller; retry shortly"
        if busy is not None:
            self.stats.rejected += 1
            await APIError(
                429, busy, type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"}
            ).response()(scope, receive, send)
            return
        # The slot is taken before the body is read: uploads count against the limit too.
        self.stats.in_flight += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        try:
            try:
                async with asyncio.timeout(self.body_timeout):
                    body = await self._read_body(scope, receive)
            except TimeoutError:
                await APIError(
                    408, f"the request body did not arrive within {self.body_timeout:g} s", code="request_timeout"
                ).response()(scope, receive, send)
                return
            except APIError as error:
                await error.response()(scope, receive, send)
                return
            if body is None:  # the client left while sending: nobody to answer
                return
            scope.setdefault("state", {})["owner"] = owner_of(key)
            replayed = False

            async def replay() -> Message:  # the buffered body, then the client's later messages
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            async def timed(message: Message) -> None:  # a client that stops reading is let go
                try:
                    async with asyncio.timeout(self.write_timeout):
                        await send(message)
                except TimeoutError:
                    raise WriteTimeout from None

            try:
                await self.app(scope, replay, timed)
            except Exception as error:
                if not _only(error, WriteTimeout):
                    raise
                # Returning with the response unfinished makes the server close the connection;
                # the routes' cleanup has stopped the generation already.
        finally:
            self.stats.in_flight -= 1
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]

    def _authenticate(self, scope: Scope) -> str | None:
        return authenticate(scope, self.api_keys)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body (None if the client left); 413 past the limit."""
        too_large = APIError(
            413, f"the request body is over the {self.max_body / 1e6:g} MB limit", code="request_too_large"
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _only(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `error` is a `kind`, or a group of nothing else (task groups wrap what they raise)."""
    if isinstance(error, BaseExceptionGroup):
        return all(_only(inner, kind) for inner in error.exceptions)
    return isinstance(error, kind)


def authenticate(scope: Scope, api_keys: Sequence[bytes]) -> str | None:
    """The caller's key (None without keys): a bearer header, or for a WebSocket the
    `openai-insecure-api-key.<key>` subprotocol browsers send; a 401 `APIError` otherwise."""
    if not api_keys:
        return None
    headers = dict(scope["headers"])
    scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        key = ""
    if not key.strip() and scope["type"] == "websocket":
        offered = headers.get(b"sec-websocket-protocol", b"").decode("latin-1").split(",")
        key = next((p.strip()[len(INSECURE_KEY) :] for p in offered if p.strip().startswith(INSECURE_KEY)), "")
    challenge = {"WWW-Authenticate": 'Bearer realm="voxtune"'}
    if not key.strip():
        raise APIError(
            401, "no API key given: send 'Authorization: Bearer <key>'", code="missing_api_key", headers=challenge
        )
    key = key.strip()
    if not any(hmac.compare_digest(key.encode(), known) for known in api_keys):
        raise APIError(401, "incorrect API key", code="invalid_api_key", headers=challenge)
    return key
