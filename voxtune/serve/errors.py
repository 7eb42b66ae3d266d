"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every input problem the Python API raises (an `InputError`) maps to a 4xx here, chosen by its
class; the message is the API's own one-line message. Nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Collection
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from voxtune.audio import AudioTooLongError
from voxtune.audio.voices import VoiceError
from voxtune.errors import InputError
from voxtune.infer.audio_store import AudioNotFoundError

logger = logging.getLogger(__name__)
_TYPE_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|.*\[.*\])$")


class APIError(Exception):
    """An error response: HTTP `status` and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_input_error(error: InputError, param: str | None = None) -> APIError:
    """The response for an input problem the Python API raised."""
    message = str(error)
    if isinstance(error, AudioNotFoundError):
        return APIError(404, message, param=param, code="audio_not_found")
    if isinstance(error, AudioTooLongError):
        return APIError(413, message, param=param, code="audio_too_long")
    if isinstance(error, VoiceError):
        return APIError(400, message, param=param or "voice", code="invalid_value")
    return APIError(400, message, param=param, code="invalid_value")


def from_validation_error(error: ValidationError, prefix: str = "", tags: Collection[str] = ()) -> APIError:
    """A 400 naming the first bad field, in words (never the raw pydantic dump). `tags`: the
    values of the tagged unions in lists, which pydantic writes after the index
    ("messages.0.user.content"): not fields either."""
    first = error.errors(include_url=False, include_input=False)[0]
    loc = first["loc"]
    parts: list[int | str] = []
    for index, part in enumerate(loc):
        # pydantic puts the union member it tried into the location ("voice.str"): not a field.
        tag = part in tags and index > 0 and isinstance(loc[index - 1], int)
        if isinstance(part, str) and (_TYPE_TAG.match(part) or tag):
            continue
        parts.append(part)
    if not parts and not prefix:
        return APIError(400, "the request body must be a JSON object", code="invalid_value")
    location = prefix + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "this field is required"
    return APIError(400, f"{location}: {message}", param=location or None, code="invalid_value")


def parse_json(body: bytes) -> Any:
    """The JSON of a request body, or a 400 saying it is not JSON."""
    try:
        data = json.loads(body)
        # Lone surrogates ("\ud800") parse but are not text any tokenizer or hash can take.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
    except UnicodeEncodeError:
        raise APIError(
            400, "the request body holds text that is not valid Unicode (a lone surrogate)", code="invalid_json"
        ) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    return data


async def read_json(request: Request) -> Any:
    """The JSON of a request's body, parsed off the event loop (a body of megabytes takes a
    while, and the loop serves every other client meanwhile); a 400 when it is not JSON."""
    body = await request.body()
    return parse_json(body) if len(body) < 64 << 10 else await asyncio.to_thread(parse_json, body)


async def api_error_handler(request: Request, error: APIError) -> JSONResponse:
    """An `APIError` raised by a route."""
    return error.response()


async def input_error_handler(request: Request, error: InputError) -> JSONResponse:
    """An input problem the Python API raised under a route."""
    return from_input_error(error).response()


async def http_error_handler(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, wrong method) in OpenAI's shape."""
    kind = "invalid_request_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    message = error.detail if isinstance(error.detail, str) else "bad request"
    if error.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    return APIError(
        error.status_code, message, type=kind, code=code, headers=getattr(error, "headers", None)
    ).response()


async def unexpected_error_handler(request: Request, error: Exception) -> JSONResponse:
    """A bug: logged with its traceback; the client gets a 500 in OpenAI's shape."""
    logger.exception("error while serving %s %s", request.method, request.url.path)
    return APIError(500, "the server hit an internal error; it has been logged", type="server_error").response()
