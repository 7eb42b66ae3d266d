"""The FastAPI app: OpenAI-compatible routes over one `Runtime`, behind the `Gate`."""

from __future__ import annotations

import html
import time
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.websockets import WebSocket

import voxtune
from voxtune.errors import InputError, echo
from voxtune.infer.runtime import Runtime
from voxtune.serve import audio, chat
from voxtune.serve.bridge import Drain
from voxtune.serve.config import ServeConfig
from voxtune.serve.errors import (
    APIError,
    api_error_handler,
    http_error_handler,
    input_error_handler,
    unexpected_error_handler,
)
from voxtune.serve.gate import Gate, GateStats
from voxtune.serve.metrics import CONTENT_TYPE, ServerMetrics
from voxtune.serve.openapi import install_openapi
from voxtune.serve.realtime import Sessions, serve_realtime
from voxtune.serve.realtime.session import EarlyReplies

ROUTES = (
    "/",
    "/health",
    "/metrics",
    "/openapi.json",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/audio/transcriptions",
    "/v1/audio/speech",
)


def default_model_id(config: ServeConfig) -> str:
    """The id a served model is listed under: the configured one, else its folder or repo name."""
    if config.model_id:
        return config.model_id
    return Path(config.model).name if config.model else "voxtune-tiny"


def create_app(runtime: Runtime, config: ServeConfig) -> FastAPI:
    """The app serving `runtime` under `config` (the runtime is not closed by the app)."""
    model_id = default_model_id(config)
    created = int(time.time())
    limits = config.limits
    # No trailing-slash redirects: a client that adds one gets a 404 in OpenAI's shape.
    app = FastAPI(
        title="voxtune",
        version=voxtune.__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        redirect_slashes=False,
    )
    install_openapi(app, with_keys=bool(config.api_keys))
    app.state.drain = Drain()
    # FastAPI's decorator form, as add_exception_handler's annotation wants handlers of any Exception.
    app.exception_handler(APIError)(api_error_handler)
    app.exception_handler(InputError)(input_error_handler)
    app.exception_handler(HTTPException)(http_error_handler)
    app.exception_handler(Exception)(unexpected_error_handler)
    gate = GateStats()
    app.add_middleware(
        Gate,
        api_keys=config.api_keys,
        max_body=int(limits.max_body_mb * 1e6),
        max_concurrent=limits.max_concurrent,
        stats=gate,
        paths=ROUTES,
        body_timeout=limits.body_timeout_seconds,
        per_client=limits.per_client,
        write_timeout=limits.write_timeout_seconds,
    )

    def check_model(name: str) -> None:
        known = name == model_id or any(name == a or name.startswith(a + "-") for a in config.aliases)
        if not known:
            raise APIError(
                404,
                f"the model {echo(name)} does not exist; this server serves {model_id!r}",
                param="model",
                code="model_not_found",
            )

    playground = (Path(__file__).parent / "playground" / "index.html").read_text()
    playground = playground.replace("__MODEL_ID__", html.escape(model_id, quote=True))

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:  # the playground: microphone -> /v1/realtime -> speaker
        return HTMLResponse(playground)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id}

    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:
        return Response()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(name)
        return _model_card(model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await chat.chat_completions(request, runtime, model_id, limits.max_tokens, check_model)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await audio.transcriptions(request, runtime, check_model)

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        return await audio.speech(request, runtime, check_model, limits.max_speech_chars)

    sessions = Sessions(
        limits.max_realtime_sessions, early_replies=EarlyReplies() if config.realtime_early_replies else None
    )

    @app.websocket("/v1/realtime")
    async def realtime(socket: WebSocket) -> None:
        await serve_realtime(
            socket,
            runtime=runtime,
            model_id=model_id,
            api_keys=[k.encode() for k in config.api_keys],
            check_model=check_model,
            drain=app.state.drain,
            max_tokens=limits.max_tokens,
            sessions=sessions,
            write_timeout=limits.write_timeout_seconds,
        )

    metrics = ServerMetrics(runtime, gate, sessions)

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.state.runtime = runtime
    return app


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "voxtune"}
