"""Chat completions through the official client: audio in, text and speech out, streaming,
multi-turn by audio id, tools, and every error in OpenAI's shape."""

from __future__ import annotations

import base64
import itertools
import json
import re
import socket
import threading
import time

import httpx2
import numpy as np
import openai
import pytest

from tests.serve.conftest import KEYS, audio_part
from tests.waiting import wait_until
from voxtune.audio import Audio, encode, load, voices
from voxtune.serve.config import ServeConfig
from voxtune.serve.server import build_runtime, running_server

MODEL = "voxtune-tiny"


def ask(clip: bytes, fmt: str = "wav", text: str | None = None) -> list[dict]:
    content = [audio_part(clip, fmt)] + ([{"type": "text", "text": text}] if text else [])
    return [{"role": "user", "content": content}]


def metric(server: str, name: str) -> float:
    body = httpx2.get(server + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", body, re.M).group(1))


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx2.get(server + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "webm", "pcm16"])
def test_audio_in_every_format_gets_a_text_reply(client, fmt):
    speech = voices.synthesize("What is seven plus five?", "en")
    data = encode(speech, "opus") if fmt == "webm" else encode(speech, fmt)
    if fmt == "webm":  # Opus in WebM, as browsers record it
        import io

        import av  # noqa: E401

        source, out = av.open(io.BytesIO(data)), io.BytesIO()
        with av.open(out, "w", format="webm") as sink:
            stream = sink.add_stream("libopus", rate=48000)
            for frame in source.decode(audio=0):
                frame.pts = None
                for packet in stream.encode(frame):
                    sink.mux(packet)
            for packet in stream.encode(None):
                sink.mux(packet)
        data = out.getvalue()
    reply = client.chat.completions.create(model=MODEL, messages=ask(data, fmt))
    message = reply.choices[0].message
    assert isinstance(message.content, str) and message.content.strip()
    assert message.audio is None
    assert reply.usage.prompt_tokens_details.audio_tokens >= 5  # ~1.5 s at 6.25 audio tokens/s
    assert (
        reply.usage.prompt_tokens
        == reply.usage.prompt_tokens_details.audio_tokens + reply.usage.prompt_tokens_details.text_tokens
    )
    (clip,) = reply.model_extra["input_audio"]
    assert clip["id"].startswith("audio_") and clip["expires_at"] > 0


def test_the_model_hears_the_audio(client):
    """Transcribing through chat gives the words: the audio reached the model."""
    speech = encode(voices.synthesize("Zwei plus drei", "de"), "wav")
    reply = client.chat.completions.create(
        model=MODEL, messages=ask(speech, text="<|task:transcribe|>"), max_completion_tokens=32
    )
    assert reply.choices[0].message.content.startswith("<|lang:de|>")


def test_text_only_and_system_prompts(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=8,
    )
    assert reply.usage.prompt_tokens_details.audio_tokens == 0
    assert reply.usage.completion_tokens <= 8


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "aac", "pcm16"])
def test_audio_out_in_each_format(client, question, fmt):
    reply = client.chat.completions.create(
        model=MODEL, modalities=["text", "audio"], audio={"voice": "alloy", "format": fmt}, messages=ask(question)
    )
    message = reply.choices[0].message
    assert message.content is None
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > reply.created
    assert message.audio.transcript and "<|" not in message.audio.transcript
    data = base64.b64decode(message.audio.data)
    audio = load(data, 16000, format=fmt, rate=24000 if fmt == "pcm16" else None)
    assert audio.duration > 0.3 and np.abs(audio.samples).max() > 0.05


def test_streamed_text_equals_the_whole_reply(client, question):
    asked = ask(question, text="Transcribe the audio.")  # a reply of several tokens
    whole = client.chat.completions.create(model=MODEL, messages=asked).choices[0].message.content
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=asked, stream=True, stream_options={"include_usage": True})
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole
    assert sum(1 for p in pieces if p) >= 2  # sent piece by piece, not at the end
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_streamed_audio_sends_transcript_then_pcm16_then_expiry(client, question):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ask(question),
            modalities=["text", "audio"],
            audio={"voice": "nova", "format": "pcm16"},
            stream=True,
            temperature=0,  # the model's own answer to a spoken question: words to speak
        )
    )
    parts = [
        c.choices[0].delta.audio.model_dump(exclude_none=True) for c in chunks if c.choices and c.choices[0].delta.audio
    ]
    ids = {p["id"] for p in parts if "id" in p}
    assert len(ids) == 1 and next(iter(ids)).startswith("audio_")
    transcript = "".join(p.get("transcript", "") for p in parts)
    pcm = b"".join(base64.b64decode(p["data"]) for p in parts if "data" in p)
    assert transcript.strip() and len(pcm) % 2 == 0
    assert len(pcm) / 2 / 24000 > 0.1, transcript  # 24 kHz 16-bit mono; a reply of one syllable is enough
    assert set(parts[-1]) == {"expires_at"}  # the last audio chunk carries only the expiry
    first_data = next(i for i, p in enumerate(parts) if "data" in p)
    assert any("transcript" in p for p in parts[:first_data])


def test_streamed_audio_must_be_pcm16(client, question):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=ask(question),
            modalities=["text", "audio"],
            audio={"voice": "alloy", "format": "mp3"},
            stream=True,
        )
    assert caught.value.body["param"] == "audio.format" and "pcm16" in caught.value.body["message"]


def test_multi_turn_by_audio_id_and_ownership(client, other_client, question, server):
    first = client.chat.completions.create(
        model=MODEL, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, messages=ask(question)
    )
    reply_id = first.choices[0].message.audio.id
    clip_id = first.model_extra["input_audio"][0]["id"]
    encoded, reused = (
        metric(server, "voxtune_audio_clips_encoded_total"),
        metric(server, "voxtune_audio_clips_reused_total"),
    )
    history = [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"id": clip_id}}]},
        {"role": "assistant", "audio": {"id": reply_id}},
        {"role": "user", "content": "And once more?"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history)
    assert second.model_extra["input_audio"] == [
        {"id": clip_id, "expires_at": second.model_extra["input_audio"][0]["expires_at"], "reused": True}
    ]
    # The earlier clip was not encoded again, and the reply's text is in the prompt.
    assert metric(server, "voxtune_audio_clips_encoded_total") == encoded
    assert metric(server, "voxtune_audio_clips_reused_total") == reused + 1
    without_reply = client.chat.completions.create(model=MODEL, messages=[history[0], history[2]])
    assert second.usage.prompt_tokens > without_reply.usage.prompt_tokens
    for audio_id, message in ((reply_id, history[1]), (clip_id, history[0])):
        with pytest.raises(openai.NotFoundError) as caught:
            other_client.chat.completions.create(model=MODEL, messages=[message, history[2]])
        assert audio_id in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "assistant", "audio": {"id": "audio_unknown"}}, history[2]]
        )


def test_the_same_clip_sent_again_is_not_encoded_again(client, server):
    clip = encode(voices.synthesize("Open the window, please.", "en"), "wav")
    client.chat.completions.create(model=MODEL, messages=ask(clip))
    encoded = metric(server, "voxtune_audio_clips_encoded_total")
    again = client.chat.completions.create(model=MODEL, messages=ask(clip))
    assert again.model_extra["input_audio"][0]["reused"] is True
    assert metric(server, "voxtune_audio_clips_encoded_total") == encoded


def test_tools_are_accepted_and_tool_turns_read(client, question):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two numbers",
                "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
            },
        }
    ]
    messages = ask(question) + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 7, "b": 5}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="auto")
    plain = client.chat.completions.create(model=MODEL, messages=messages[:1])
    assert reply.choices[0].finish_reason in ("stop", "tool_calls", "length")
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 30  # the tools and the call are in the prompt
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=messages, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}
        )


def test_sampling_is_seeded(client, question):
    def run():
        return (
            client.chat.completions.create(
                model=MODEL, messages=ask(question), temperature=1.0, top_p=0.9, seed=7, max_completion_tokens=12
            )
            .choices[0]
            .message.content
        )

    assert run() == run()


def test_a_burst_of_concurrent_requests_is_answered_and_batched(client, question, server):
    clips = [encode(voices.synthesize(f"What is {n} plus {n}?", "en"), "wav") for n in range(2, 14)]
    results: list = [None] * len(clips)

    def one(i: int) -> None:
        results[i] = client.chat.completions.create(model=MODEL, messages=ask(clips[i]), max_completion_tokens=24)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clips))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r is not None and r.choices[0].message.content is not None for r in results)
    assert metric(server, "voxtune_engine_peak_batch") >= 2


# ---- errors -------------------------------------------------------------------------------------


def post(
    server: str, body: bytes | dict, key: str | None = KEYS[0], path: str = "/v1/chat/completions"
) -> httpx2.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(server + path, content=content, headers=headers, timeout=60)


def error_of(response: httpx2.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "pydantic" not in error["message"] and "'loc'" not in error["message"]
    return error


def test_auth(server, question):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert error_of(post(server, body, key=None), 401)["code"] == "missing_api_key"
    assert error_of(post(server, body, key="nope"), 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        ({"model": MODEL}, 400, "messages"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "modalities": ["audio"]}, 400, "audio"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "modalities": ["text", "audio"],
                "audio": {"voice": "nobody", "format": "wav"},
            },
            400,
            "audio.voice",
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "modalities": ["text", "audio"],
                "audio": {"voice": "alloy", "format": "ogg"},
            },
            400,
            "audio.format",
        ),
        ({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0]"),
        ({"model": MODEL, "messages": ["hi"]}, 400, "messages[0]"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            400,
            "messages[0].content[0]",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": []}]}, 400, "messages[0].content"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            400,
            "messages[0].content[0].text",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogv"}}],
                    },
                ],
            },
            400,
            "messages[1].content[0].input_audio",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
                ],
            },
            400,
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"model": MODEL, "messages": [{"role": "assistant", "audio": {"id": 7}}]}, 400, "messages[0].audio.id"),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "***", "format": "wav"}}],
                    }
                ],
            },
            400,
            None,
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "input_audio",
                                "input_audio": {
                                    "data": base64.b64encode(b"RIFF1234WAVEjunk" * 50).decode(),
                                    "format": "wav",
                                },
                            }
                        ],
                    }
                ],
            },
            400,
            None,
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "/etc/passwd", "format": "wav"}}],
                    }
                ],
            },
            400,
            None,
        ),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    error = error_of(post(server, body), status)
    if param is not None:
        assert error["param"] == param
    assert error["message"]


def test_silent_and_mislabelled_audio_are_named(server):
    silence = encode(Audio(np.zeros(16000, np.float32), 16000), "wav")
    body = {"model": MODEL, "messages": ask(silence)}
    assert "silent" in error_of(post(server, body), 400)["message"]
    mp3 = encode(voices.synthesize("hello", "en"), "mp3")
    body = {"model": MODEL, "messages": ask(mp3, fmt="wav")}
    assert "messages[0].content[0]" in error_of(post(server, body), 400)["message"]


def test_unknown_routes_are_openai_404s(server):
    error_of(post(server, {"x": 1}, path="/v1/nothing"), 404)


def test_limits_body_audio_and_concurrency(builtin_model, question):
    config = ServeConfig(limits={"max_body_mb": 0.2, "max_audio_seconds": 1.0, "max_concurrent": 1})
    runtime = build_runtime(config, builtin_model)
    try:
        with running_server(runtime, config) as url:
            big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 300_000}]}
            assert error_of(post(url, big, key=None), 413)["code"] == "request_too_large"
            long = {"model": MODEL, "messages": ask(question)}  # 1.5 s of speech
            assert error_of(post(url, long, key=None), 413)["code"] == "audio_too_long"
            assert metric(url, "voxtune_audio_clips_encoded_total") == 0  # refused before encoding
            assert metric(url, "voxtune_audio_store_entries") == 0
            # One long speech request holds the only slot; the next is turned away with 429.
            slow = threading.Thread(
                target=post,
                args=(
                    url,
                    {
                        "model": "tts-1",
                        "voice": "alloy",
                        "input": "One more sentence. " * 60,
                        "response_format": "wav",
                    },
                    None,
                    "/v1/audio/speech",
                ),
            )
            slow.start()
            wait_until(lambda: metric(url, "voxtune_requests_in_flight") >= 1, "the slow request in flight")
            refused = post(url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, key=None)
            slow.join()
            assert error_of(refused, 429)["code"] == "rate_limit_exceeded"
            assert refused.headers["Retry-After"] == "1"
            assert metric(url, "voxtune_requests_rejected_total") == 1
            counted = httpx2.get(url + "/metrics").text
            assert 'voxtune_requests_total{path="/v1/chat/completions",status="429"} 1' in counted
            assert 'voxtune_requests_total{path="/v1/chat/completions",status="413"} 2' in counted
    finally:
        runtime.close()


def test_a_client_that_goes_away_stops_its_generation():
    """The stream would run for 2000 tokens (ignore_eos); closing it stops the decoding."""
    from voxtune.model import tiny

    runtime = build_runtime(ServeConfig(), tiny("llama", "streaming", seed=0))
    try:
        with running_server(runtime, ServeConfig(limits={"max_tokens": 2000})) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            stream = client.chat.completions.create(
                model="voxtune-tiny",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                max_tokens=2000,
                extra_body={"ignore_eos": True},
            )
            for _ in itertools.islice(stream, 5):
                pass
            stream.close()
            for _ in range(200):
                if runtime.engine.active == 0:
                    break
                threading.Event().wait(0.05)
            assert runtime.engine.active == 0
            assert runtime.engine.steps < 1000, runtime.engine.steps
    finally:
        runtime.close()


def test_a_short_request_does_not_wait_for_a_long_one(client, question):
    """A 1000-token reply is decoding when a short request arrives: the short one joins the
    batch and finishes first."""
    finished: dict[str, float] = {}
    started = threading.Event()

    def long() -> None:
        stream = client.chat.completions.create(
            model=MODEL, messages=ask(question), stream=True, max_tokens=1000, extra_body={"ignore_eos": True}
        )
        for _ in stream:
            started.set()
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=long)
    thread.start()
    started.wait(timeout=60)
    reply = client.chat.completions.create(model=MODEL, messages=ask(question), max_tokens=8)
    finished["short"] = time.monotonic()
    thread.join()
    assert reply.choices[0].message.content
    assert finished["short"] < finished["long"]


def test_a_client_that_hangs_up_on_a_whole_reply_stops_it(server):
    """Not streamed: the server notices the closed connection while the reply decodes."""
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "ignore_eos": True}
    ).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEYS[0]}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: metric(server, "voxtune_engine_active") >= 1, "the request decoding")
    steps = metric(server, "voxtune_engine_steps_total")
    for _ in range(100):
        if metric(server, "voxtune_engine_active") == 0:
            break
        time.sleep(0.05)
    assert metric(server, "voxtune_engine_active") == 0
    assert metric(server, "voxtune_engine_steps_total") - steps < 900  # 1000 without the cancel


def test_without_a_token_limit_a_long_prompt_gets_the_room_that_is_left(client):
    """The server's limit (1024) does not fit after a 1500-token prompt in a 2048 context:
    the reply gets what is left instead of an error."""
    long = "one two three four five " * 150
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": long}], extra_body={"ignore_eos": True}
    )
    assert reply.usage.prompt_tokens > 1024
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 2048
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 2**70, "temperature": 1},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": "f"},
        },
        {
            "model": MODEL,
            "messages": [{"role": "assistant", "content": None, "tool_calls": 5}, {"role": "user", "content": "hi"}],
        },
        {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]},
    ],
)
def test_odd_input_is_a_400_not_a_500(server, body):
    error_of(post(server, json.dumps(body).encode()), 400)


def test_deeply_nested_json_is_a_400(server):
    error_of(post(server, b"[" * 100_000 + b"]" * 100_000), 400)


def test_a_stalled_upload_is_timed_out_and_frees_its_slot(builtin_model):
    config = ServeConfig(limits={"max_concurrent": 1, "body_timeout_seconds": 0.5})
    runtime = build_runtime(config, builtin_model)
    try:
        with running_server(runtime, config) as url:
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
                answer = b""
                while b"request_timeout" not in answer and (chunk := sock.recv(4096)):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
            ok = post(url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, key=None)
            assert ok.status_code == 200
    finally:
        runtime.close()
