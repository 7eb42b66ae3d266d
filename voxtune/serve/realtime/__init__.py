"""`/v1/realtime`: OpenAI's Realtime API (GA dialect) over a WebSocket, on the same runtime,
batching engine and audio store as the HTTP routes.

    ws://host:port/v1/realtime?model=<id>            a voice conversation
    ws://host:port/v1/realtime?intent=transcription  transcription only

Keys as over HTTP (a bearer header), or the `openai-insecure-api-key.<key>` subprotocol that
browsers send. A refused connection is accepted, told why in an `error` event, and closed
(1008 for a key or model, 1013 when the server holds its limit of sessions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket

from voxtune.serve.errors import APIError
from voxtune.serve.gate import authenticate, owner_of
from voxtune.serve.realtime.session import EarlyReplies, Session


@dataclass
class Sessions:
    """Realtime sessions open now, and the most there may be."""

    limit: int
    active: int = 0
    early_replies: EarlyReplies | None = None  # None: off


async def serve_realtime(
    socket: WebSocket,
    *,
    runtime: Any,
    model_id: str,
    api_keys: list[bytes],
    check_model: Any,
    drain: Any,
    max_tokens: int,
    sessions: Sessions,
    write_timeout: float = 30.0,
) -> None:
    """Authenticate, open and run one session until the client leaves."""
    offered = [p.strip() for p in socket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    await socket.accept(subprotocol="realtime" if "realtime" in offered else None)

    async def refuse(message: str, code: str, close: int) -> None:
        event = {
            "type": "error",
            "event_id": "event_refused",
            "error": {
                "type": "invalid_request_error",
                "code": code,
                "message": message,
                "param": None,
                "event_id": None,
            },
        }
        await socket.send_json(event)
        await socket.close(code=close, reason=message[:120])

    try:
        key = authenticate(socket.scope, api_keys)
        query = socket.query_params
        transcription = query.get("intent") == "transcription"
        if query.get("model") or not transcription:
            check_model(query.get("model") or "")
    except APIError as error:
        await refuse(error.message, error.code or "invalid_request", 1008)
        return
    if sessions.active >= sessions.limit:
        await refuse(
            f"the server holds {sessions.limit} realtime sessions, its limit; retry shortly", "session_limit", 1013
        )
        return
    sessions.active += 1
    try:
        session = Session(
            socket,
            runtime,
            model_id,
            owner_of(key),
            drain,
            max_tokens,
            "transcription" if transcription else "realtime",
            write_timeout,
            sessions.early_replies,
        )
        await session.run()
    finally:
        sessions.active -= 1


__all__ = ["Sessions", "serve_realtime"]
