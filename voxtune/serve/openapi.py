"""The OpenAPI document the server publishes at `/openapi.json`.

The routes read their bodies themselves (to bound and time them), so FastAPI cannot see what
they take; the request bodies are added here from the same pydantic models the routes
validate with, and the transcription form from its field list.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from voxtune.infer.runtime import INPUT_FORMATS
from voxtune.serve.audio import TRANSCRIPT_FORMATS, SpeechRequest
from voxtune.serve.chat import ChatRequest

REF = "#/components/schemas/{model}"

ERROR: dict[str, Any] = {  # every 4xx, as OpenAI sends them
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

# What `messages` holds, as the runtime reads it (the route takes the list as it comes and the
# runtime checks each message, with messages that name the message and part at fault).
_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_AUDIO_PART = {
    "type": "object",
    "required": ["type", "input_audio"],
    "properties": {
        "type": {"const": "input_audio"},
        "input_audio": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["data", "format"],
                    "properties": {
                        "data": {"type": "string", "contentEncoding": "base64"},
                        "format": {"enum": list(INPUT_FORMATS)},
                    },
                },
                {
                    "type": "object",
                    "required": ["id"],
                    "properties": {"id": {"type": "string"}},
                    "description": "a clip an earlier request stored (its id in that reply's input_audio)",
                },
            ]
        },
    },
}
_TEXT = {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}
MESSAGE: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"enum": ["system", "developer"]}, "content": _TEXT},
        },
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"const": "user"},
                "content": {
                    "oneOf": [
                        {"type": "string"},
                        {"type": "array", "minItems": 1, "items": {"oneOf": [_TEXT_PART, _AUDIO_PART]}},
                    ]
                },
            },
        },
        {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"const": "assistant"},
                "content": {"oneOf": [_TEXT, {"type": "null"}]},
                "audio": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
                "tool_calls": {"type": "array", "items": {"type": "object"}},
            },
        },
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"const": "tool"}, "content": _TEXT, "tool_call_id": {"type": "string"}},
        },
    ]
}

TRANSCRIPTION_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["file", "model"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the audio (any format ffmpeg reads)"},
        "model": {"type": "string"},
        "language": {"type": "string", "description": "ISO-639-1 code; detected when left out"},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": list(TRANSCRIPT_FORMATS)},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["segment"]}},
        "stream": {"type": "boolean"},
    },
}


def install_openapi(app: FastAPI, *, with_keys: bool) -> None:
    """Serve the document at /openapi.json (built once, at first request)."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, with_keys)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]  # FastAPI's documented way to extend it


def _document(app: FastAPI, with_keys: bool) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        routes=app.routes,
        description="OpenAI-compatible speech LM server (voxtune)",
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    paths = schema["paths"]
    paths["/v1/chat/completions"]["post"]["requestBody"] = _json_body(ChatRequest, components)
    components["ChatRequest"]["properties"]["messages"]["items"] = {"$ref": REF.format(model="Message")}
    components["Message"] = MESSAGE
    paths["/v1/audio/speech"]["post"]["requestBody"] = _json_body(SpeechRequest, components)
    paths["/v1/audio/transcriptions"]["post"]["requestBody"] = {
        "required": True,
        "content": {"multipart/form-data": {"schema": TRANSCRIPTION_FORM}},
    }
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, never sent here
        components.pop(unused, None)
    components["Error"] = ERROR
    for operations in paths.values():
        for operation in operations.values():
            operation["responses"].pop("422", None)  # FastAPI's own validation error, never sent here
            operation["responses"]["4XX"] = {
                "description": "the request cannot be served as sent",
                "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
            }
    if with_keys:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in paths.items():
            if path not in ("/health", "/metrics", "/openapi.json"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    return schema


def _json_body(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """A JSON request body of `model`, its nested models moved into the components."""
    body = model.model_json_schema(ref_template=REF)
    components.update(body.pop("$defs", {}))
    components[model.__name__] = body
    return {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}
