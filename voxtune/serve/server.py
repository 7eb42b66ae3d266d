"""Running the app under uvicorn: `serve` (the `voxtune serve` command) and `running_server`
(a server on a background thread, for tests, benchmarks and notebooks)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

import voxtune
from voxtune.infer.runtime import Runtime
from voxtune.serve.app import create_app, default_model_id
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


def examples(base_url: str, model_id: str, api_key: str | None) -> str:
    """A working curl example and a Python one for a server at `base_url`."""
    auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    key = api_key or "unused"
    return f"""\
Try it (make a question with `voxtune speak "What is seven plus five?" --out question.wav`):

  curl {base_url}/v1/audio/transcriptions{auth} -F file=@question.wav -F model={model_id}

  curl {base_url}/v1/chat/completions{auth} -H "Content-Type: application/json" -d '{{
    "model": "{model_id}",
    "messages": [{{"role": "user", "content": [{{"type": "input_audio",
      "input_audio": {{"data": "'"$(base64 -w0 question.wav)"'", "format": "wav"}}}}]}}]}}'

Python (pip install openai):

  import base64
  from openai import OpenAI
  client = OpenAI(base_url="{base_url}/v1", api_key="{key}")
  clip = base64.b64encode(open("question.wav", "rb").read()).decode()
  reply = client.chat.completions.create(
      model="{model_id}", modalities=["text", "audio"], audio={{"voice": "alloy", "format": "wav"}},
      messages=[{{"role": "user", "content": [{{"type": "input_audio", "input_audio": {{"data": clip, "format": "wav"}}}}]}}],
  )
  print(reply.choices[0].message.audio.transcript)
  open("reply.wav", "wb").write(base64.b64decode(reply.choices[0].message.audio.data))
"""


def serve(config: ServeConfig, *, log=lambda text: print(text, flush=True)) -> None:
    """Load the model and serve it until interrupted."""
    sock = _bind(config.host, config.port)  # a port in use fails before the model loads
    runtime = build_runtime(config)
    app = create_app(runtime, config)
    host, port = sock.getsockname()[:2]
    base_url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    log(f"voxtune serves {default_model_id(config)} at {base_url}/v1 (Ctrl-C stops it)")
    log(examples(base_url, default_model_id(config), config.api_keys[0] if config.api_keys else None))
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        runtime.close()


@contextmanager
def running_server(runtime: Runtime, config: ServeConfig | None = None) -> Iterator[str]:
    """Serve `runtime` on 127.0.0.1 (a free port) in a background thread; yields the base URL
    (e.g. "http://127.0.0.1:41234"). The runtime stays open afterwards."""
    config = config or ServeConfig()
    sock = _bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(runtime, config), log_level="warning", timeout_graceful_shutdown=2))
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
        thread.join(timeout=10)
        sock.close()


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
