"""Property-based fuzzing of every endpoint from the published OpenAPI document (schemathesis):
valid and invalid requests alike get no 5xx, every 4xx is in OpenAI's shape, and the server is
healthy afterwards. Deterministic (derandomised) and bounded, so it runs in `make test`."""

from __future__ import annotations

import httpx2
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from voxtune.model import tiny
from voxtune.serve.config import ServeConfig
from voxtune.serve.server import build_runtime, running_server

EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 40}  # per operation: about 30 s on 2 cores


@pytest.fixture(scope="module")
def url():
    """A server on a tiny model whose limits keep fuzzed requests cheap (short replies and speech)."""
    config = ServeConfig(limits={"max_tokens": 8, "max_speech_chars": 120, "max_audio_seconds": 20})
    runtime = build_runtime(config, tiny("llama", "streaming", seed=0))
    with running_server(runtime, config) as base:
        yield base
    runtime.close()


def test_the_openapi_document_names_every_route_and_its_request_model(url):
    document = httpx2.get(url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/audio/speech", "/v1/audio/transcriptions", "/v1/models"} <= set(
        document["paths"]
    )
    chat = document["components"]["schemas"]["ChatRequest"]
    assert {"model", "messages"} <= set(chat["required"]) and chat["properties"]["stream"]["type"] == "boolean"
    form = document["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["file"]["format"] == "binary"


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_fuzzed_requests_get_no_5xx_and_openai_shaped_4xx(url, mode):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not (len(operation.body) or len(operation.path_parameters)):
            continue  # nothing to send wrong (GET /health, /metrics, /v1/models)

        @settings(
            max_examples=EXAMPLES[mode],
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "voxtune-tiny"  # past the model check, into the request's handling
            response = case.call(base_url=url, timeout=60)
            where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            assert response.status_code < 500, where
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], where

        try:
            check()
        except Unsatisfiable:
            # Negative mode found no input its schema forbids (a path name, which any string is).
            assert mode is GenerationMode.NEGATIVE, operation.label
            continue
        tried += 1
    assert tried >= (6 if mode is GenerationMode.POSITIVE else 3)
    assert httpx2.get(url + "/health").json()["status"] == "ok"
    assert (
        httpx2.post(
            url + "/v1/chat/completions",
            json={"model": "voxtune-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        ).status_code
        == 200
    )
