"""Running the app under uvicorn: `serve` (the `voxtune serve` command) and `running_server`
(a server on a background thread, for tests, benchmarks and notebooks)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

import voxtune
from voxtune.infer.runtime import Runtime
from voxtune.serve.app import create_app, default_model_id
from voxtune.serve.bridge import Drain
from voxtune.serve.config import ServeConfig


def build_runtime(config: ServeConfig, model=None) -> Runtime:
    """The runtime for `config` (loading its model unless one is given)."""
    return Runtime(
        model if model is not None else voxtune.load(config.model),
        max_batch=config.limits.max_batch,
        store_bytes=int(config.audio_store_mb * (1 << 20)),
        audio_ttl=config.audio_ttl_seconds,
        max_audio_seconds=config.limits.max_audio_seconds,
    )


def examples(base_url: str, model_id: str, with_key: bool) -> str:
    """A working curl example and a Python one for a server at `base_url`; with keys, they read
    the key from $VOXTUNE_API_KEY (a banner must not print secrets into logs)."""
    auth = ' -H "Authorization: Bearer $VOXTUNE_API_KEY"' if with_key else ""
    key = 'os.environ["VOXTUNE_API_KEY"]' if with_key else '"unused"'
    return f"""\
Try it (make a question with `voxtune speak "What is seven plus five?" --out question.wav`):

  curl {base_url}/v1/audio/transcriptions{auth} -F file=@question.wav -F model={model_id}

  curl {base_url}/v1/chat/completions{auth} -H "Content-Type: application/json" -d '{{
    "model": "{model_id}",
    "messages": [{{"role": "user", "content": [{{"type": "input_audio",
      "input_audio": {{"data": "'"$(base64 -w0 question.wav)"'", "format": "wav"}}}}]}}]}}'

Python (pip install openai):

  import base64, os
  from openai import OpenAI
  client = OpenAI(base_url="{base_url}/v1", api_key={key})
  clip = base64.b64encode(open("question.wav", "rb").read()).decode()
  question = {{"type": "input_audio", "input_audio": {{"data": clip, "format": "wav"}}}}
  reply = client.chat.completions.create(
      model="{model_id}", modalities=["text", "audio"], audio={{"voice": "alloy", "format": "wav"}},
      messages=[{{"role": "user", "content": [question]}}],
  )
  print(reply.choices[0].message.audio.transcript)
  open("reply.wav", "wb").write(base64.b64decode(reply.choices[0].message.audio.data))
"""


def serve(config: ServeConfig, *, log=lambda text: print(text, flush=True)) -> None:
    """Load the model and serve it until interrupted (SIGINT or SIGTERM: requests in flight
    get `limits.shutdown_timeout_seconds` to finish)."""
    sock = _bind(config.host, config.port)  # a port in use fails before the model loads
    runtime = build_runtime(config)
    app = create_app(runtime, config)
    host, port = sock.getsockname()[:2]
    base_url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    log(f"voxtune serves {default_model_id(config)} at {base_url}/v1 (Ctrl-C stops it); talk to it at {base_url}/")
    if not config.api_keys and not ipaddress.ip_address(host).is_loopback:
        log(f"warning: listening on {host} without an API key: anyone who reaches it may use it (--api-key KEY)")
    log(examples(base_url, default_model_id(config), bool(config.api_keys)))
    try:
        _Server(app, config).run(sockets=[sock])
    finally:
        runtime.close()


@contextmanager
def running_server(runtime: Runtime, config: ServeConfig | None = None) -> Iterator[str]:
    """Serve `runtime` on 127.0.0.1 (a free port) in a background thread; yields the base URL
    (e.g. "http://127.0.0.1:41234"). Leaving the block stops the server as SIGTERM does; the
    runtime stays open afterwards."""
    config = config or ServeConfig()
    sock = _bind("127.0.0.1", 0)
    server = _Server(create_app(runtime, config), config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start")
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=config.limits.shutdown_timeout_seconds + 10)
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server with voxtune's limits: a bound on open connections, a deadline for
    request headers, and a drain on shutdown that ends cut streams properly."""

    def __init__(self, app: FastAPI, config: ServeConfig) -> None:
        limits = config.limits
        super().__init__(
            uvicorn.Config(
                app,
                http=_protocol(limits.header_timeout_seconds, limits.max_connections),
                # uvicorn annotates int but passes it to asyncio.wait_for, which takes fractions of a second too
                timeout_graceful_shutdown=limits.shutdown_timeout_seconds,  # type: ignore[arg-type]
                log_level="info" if config.access_log else "warning",
                access_log=config.access_log,
            )
        )
        self.drain: Drain = app.state.drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.drain.begin(self.config.timeout_graceful_shutdown or 0.0)
        await super().shutdown(sockets)


def _protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's line and headers (uvicorn
    waits for them for ever, so idle and half-sent connections would pile up), and a bound on
    open connections: one past it is answered 503 in OpenAI's shape and closed."""

    class Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's own override
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                # Answer, stop writing and let the client close: closing at once with its
                # request unread would reset the connection and lose the answer.
                self._refused = True
                transport.write(_TOO_MANY_CONNECTIONS)
                transport.write_eof()
                self._deadline = self.loop.call_later(min(header_timeout, 1.0), transport.close)
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._refused:  # a refused connection's request is read and dropped
                super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets the same deadline

        def handle_websocket_upgrade(self, event: Any) -> None:
            if self._deadline is not None:  # the WebSocket protocol owns the connection from here
                self._deadline.cancel()
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(header_timeout, self._late)

        def _late(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request read since
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def _http_response(status: str, error: dict, headers: dict[str, str]) -> bytes:
    """A whole HTTP/1.1 response with an OpenAI-shaped error body, for the protocol to write."""
    body = json.dumps({"error": {"param": None, **error}}).encode()
    fields = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close", **headers}
    return (
        f"HTTP/1.1 {status}\r\n".encode()
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in fields.items())
        + b"\r\n"
        + body
    )


_TOO_MANY_CONNECTIONS = _http_response(
    "503 Service Unavailable",
    {
        "message": "the server has as many connections open as it takes; retry shortly",
        "type": "server_error",
        "code": "too_many_connections",
    },
    {"retry-after": "1"},
)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket; a port in use is an error that says so."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(2048)
    return sock
