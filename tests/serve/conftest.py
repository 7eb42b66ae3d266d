"""A real server for the serving tests: uvicorn on 127.0.0.1 serving the built-in model, driven
by the official `openai` client. One server per session (the model loads once); tests that
need other settings start their own with `running_server`."""

from __future__ import annotations

import base64
from contextlib import contextmanager

import pytest
from openai import OpenAI

import voxtune
from voxtune.audio import encode
from voxtune.serve.config import ServeConfig
from voxtune.serve.server import build_runtime, running_server

KEYS = ("key-alice", "key-bob")


@pytest.fixture(scope="session")
def builtin_model():
    """The built-in model, loaded once."""
    return voxtune.load()


@pytest.fixture(scope="session")
def server(builtin_model):
    """Base URL of a server with two API keys (see KEYS)."""
    config = ServeConfig(api_keys=list(KEYS))
    runtime = build_runtime(config, builtin_model)
    with running_server(runtime, config) as url:
        yield url
    runtime.close()


@pytest.fixture
def client(server) -> OpenAI:
    """The official client as the first key's owner (no retries: the tests see every status)."""
    return OpenAI(base_url=server + "/v1", api_key=KEYS[0], max_retries=0, timeout=60)


@pytest.fixture
def other_client(server) -> OpenAI:
    """The official client as the second key's owner."""
    return OpenAI(base_url=server + "/v1", api_key=KEYS[1], max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def question():
    """A spoken question in the default English voice (wav bytes): one fixed render, as the
    voice's timing varies from one render to the next."""
    from voxtune.audio.voices.piper import PiperBackend

    return encode(next(PiperBackend(seed=0).render("What is seven plus five?")), "wav")


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    """An OpenAI input_audio content part."""
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


@contextmanager
def serving(model, **settings):
    """A server of its own on `model` with `settings` (ServeConfig fields): yields (url, runtime)."""
    config = ServeConfig(**settings)
    runtime = build_runtime(config, model)
    try:
        with running_server(runtime, config) as url:
            yield url, runtime
    finally:
        runtime.close()
