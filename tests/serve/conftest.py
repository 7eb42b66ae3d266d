"""A real server for the serving tests: uvicorn on 127.0.0.1 serving the built-in model, driven
by the official `openai` client. One server per session (the model loads once); tests that
need other settings start their own with `running_server`."""

from __future__ import annotations

import base64
from contextlib import contextmanager

import numpy as np
import pytest
from openai import OpenAI

import voxtune
from voxtune.audio import encode
from voxtune.serve.config import ServeConfig
from voxtune.serve.messages import parse_messages
from voxtune.serve.server import build_runtime, running_server

KEYS = ("key-alice", "key-bob")
# A Realtime function tool, as a session configures it.
ADD_TOOL = {
    "type": "function",
    "name": "add",
    "description": "Add two numbers",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
    },
}


@pytest.fixture(scope="session")
def builtin_model():
    """The built-in model, loaded once."""
    return voxtune.load()


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory):
    """A tiny model taught to call a tool, so that a real call runs end to end: offered `add`,
    it answers a spoken turn with add(a=7, b=5), and the call's result "12" with "twelve."
    ("13" with "thirteen.": it reads the result). Taught once per run (the test processes
    share it through a folder: about ten seconds on 2 cores), then loaded."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the same for every pytest-xdist worker
    folder = shared / "tool-model"
    with FileLock(str(shared / "tool-model.lock")):
        if not (folder / "voxtune.json").is_file():
            _teach_tool_call().save_pretrained(folder)
    return voxtune.load(folder)


def _teach_tool_call():
    """The tiny model of `tool_model`, taught on the prompts the server builds (the tools
    offer, the spoken request) with two voices and four silences around them."""
    import torch

    from voxtune.audio import Audio, voices
    from voxtune.audio.voices.piper import PiperBackend
    from voxtune.infer.runtime import Runtime
    from voxtune.infer.tools import render_tool_calls
    from voxtune.model import tiny

    model = tiny("llama", "streaming", seed=0)
    runtime = Runtime(model)
    tools = [{"type": "function", "function": {k: ADD_TOOL[k] for k in ("name", "description", "parameters")}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 7, "b": 5}'}}
    conversations = []
    question = "What is seven plus five?"
    # Fixed renders (the natural voice varies from one render to the next): the same model every
    # run. Several voices and silences around them, so that the call does not hang on one clip.
    clips = [next(PiperBackend(seed=1).render(question)), voices.synthesize(question, "en", "m3")]
    clips += [
        Audio(np.pad(clip.samples, (int(before * clip.sample_rate), int(after * clip.sample_rate))), clip.sample_rate)
        for before, after in ((0.3, 0.0), (0.25, 0.5), (0.5, 0.2))
        for clip in clips
    ]
    for index, speech in enumerate(clips):
        user = {"role": "user", "content": [audio_part(encode(speech, "wav"))]}
        first = runtime.prepare_chat(parse_messages([user]), "teacher", tools=tools).messages
        conversations.append([*first, {"role": "assistant", "content": render_tool_calls([call])}])
        for result, words in (("12", "twelve."), ("13", "thirteen.")) if index < 2 else ():
            turns = [user, {"role": "assistant", "content": None, "tool_calls": [call]}]
            turns.append({"role": "tool", "content": result, "tool_call_id": "call_1"})
            later = runtime.prepare_chat(parse_messages(turns), "teacher", tools=tools).messages
            conversations.append([*later, {"role": "assistant", "content": words}])
    runtime.close()
    batch = model.processor.collate([model.processor.encode_messages(c, with_labels=True) for c in conversations])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(120):
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


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
