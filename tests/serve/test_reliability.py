"""What a hostile or careless client must not do to the others: poison a batch, stall the event
loop, make the server work past its limits, hold every slot, hang on to connections, lose
replies at shutdown. Each test reproduces what a probe of the server found."""

from __future__ import annotations

import json
import socket
import threading

import httpx2
import numpy as np
import pytest

from tests.serve.conftest import KEYS, serving
from tests.serve.test_chat import MODEL, ask, error_of, metric, post
from tests.waiting import wait_until
from voxtune.audio import Audio, encode, voices
from voxtune.config import ConfigError
from voxtune.serve.config import ServeConfig

HANG = 60  # seconds: a guard against hanging, not a measured bound


def raw(url: str, data: bytes = b"", receive_buffer: int | None = None) -> socket.socket:
    """A plain TCP connection to the server that has sent `data`."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer is not None:  # set before connecting, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    sock.sendall(data)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (reading whatever it wrote first), within HANG."""
    sock.settimeout(HANG)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def speech_clip(seconds: float) -> bytes:
    """A wav of about `seconds` of speech (one synthesised sentence, repeated)."""
    sentence = voices.synthesize("The number is four hundred and four.", "en")
    repeats = int(np.ceil(seconds / sentence.duration))
    return encode(
        Audio(np.tile(sentence.samples, repeats)[: int(seconds * sentence.sample_rate)], sentence.sample_rate), "wav"
    )


# ---- one bad request, and only it, fails ----------------------------------------------------------


def test_a_poisoned_request_in_a_burst_fails_no_neighbour(client, question):
    """A top_p that rounds to 0 in float32 made the sampler raise and failed every request
    admitted with it (32 of 36 innocent requests got 500)."""
    clips = [encode(voices.synthesize(f"What is {n} plus one?", "en"), "wav") for n in range(2, 14)]
    results: dict = {}

    def one(i: int, **extra) -> None:
        try:
            results[i] = client.chat.completions.create(
                model=MODEL, messages=ask(clips[i % len(clips)]), max_completion_tokens=12, **extra
            )
        except Exception as error:  # noqa: BLE001 - recorded and asserted below
            results[i] = error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clips))]
    threads.insert(6, threading.Thread(target=one, args=(99,), kwargs={"temperature": 1, "top_p": 1e-300}))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not failed
    assert results[99].choices[0].message.content is not None  # the odd one is served as well


@pytest.mark.parametrize(
    "field, value",
    [
        ("stream", "yes"),
        ("max_tokens", "16"),
        ("max_tokens", True),
        ("temperature", True),
        ("seed", "1"),
        ("max_completion_tokens", 8.0),
        ("n", "1"),
    ],
)
def test_loose_types_are_400s_as_openai_answers_them(server, field, value):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: value}
    assert error_of(post(server, body), 400)["param"] == field


def test_speech_types_are_strict_too(server):
    body = {"model": "tts-1", "input": "hello", "voice": "alloy", "speed": True}
    assert error_of(post(server, body, path="/v1/audio/speech"), 400)["param"] == "speed"


# ---- bounded work: cheap checks before expensive ones ---------------------------------------------


def test_text_that_cannot_fit_the_context_is_refused_before_tokenising(server):
    """20 MB of text took 13-20 s of the event loop and 1.8 GB to tokenise, then was refused."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 3_400_000}]}
    error = error_of(post(server, body), 400)
    assert "characters of text" in error["message"] and "2048 tokens" in error["message"]


def test_audio_past_the_context_is_refused_before_encoding_and_never_stored(server):
    """Audio past what the built-in model takes (a 2048-token context) was decoded, encoded
    and stored, then refused for its tokens."""
    encoded, stored = metric(server, "voxtune_audio_clips_encoded_total"), metric(server, "voxtune_audio_store_entries")
    too_long = error_of(post(server, {"model": MODEL, "messages": ask(speech_clip(400))}), 413)
    assert too_long["code"] == "audio_too_long"
    assert "context holds" in too_long["message"]
    # Fits alone, not with the text beside it: refused from the token count, still not encoded.
    crowded = {"model": MODEL, "messages": ask(speech_clip(20), text="and what comes after it " * 400)}
    assert "this model reads at most 2048" in error_of(post(server, crowded), 400)["message"]
    assert metric(server, "voxtune_audio_clips_encoded_total") == encoded
    assert metric(server, "voxtune_audio_store_entries") == stored


def test_echoed_input_is_bounded(server):
    """A 1 MB model name came back whole in the 404."""
    response = post(server, {"model": "m" * 1_000_000, "messages": [{"role": "user", "content": "hi"}]})
    error = error_of(response, 404)
    assert len(response.content) < 2000 and error["message"].startswith("the model 'mmmm")


# ---- fair slots, bounded connections ---------------------------------------------------------------


def test_one_caller_cannot_take_every_slot(builtin_model):
    """64 slow uploads from one client took every slot: everyone else got 429 for 30 s."""
    with serving(builtin_model, api_keys=list(KEYS), limits={"max_concurrent": 4, "max_concurrent_per_client": 2}) as (
        url,
        _,
    ):
        start = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        ).encode()
        slow = [raw(url, start) for _ in range(2)]
        try:
            wait_until(
                lambda: metric(url, "voxtune_requests_in_flight") == 2, "the uploads to take their slots", timeout=HANG
            )
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            refused = error_of(post(url, body, key=KEYS[0]), 429)
            assert "the limit for one caller" in refused["message"]
            assert post(url, body, key=KEYS[1]).status_code == 200  # another caller is served
        finally:
            for sock in slow:
                sock.close()


def test_idle_and_half_sent_connections_are_closed(builtin_model):
    """Connections that never finished their headers stayed open for ever."""
    with serving(builtin_model, limits={"header_timeout_seconds": 0.3}) as (url, _):
        idle, half = raw(url), raw(url, b"GET /health HTTP/1.1\r\nHo")
        assert closed_by_server(idle) and closed_by_server(half)
        kept = httpx2.Client()
        assert kept.get(url + "/health").status_code == 200  # a finished request is answered as ever
        kept.close()


def test_connections_past_the_bound_get_an_openai_503(builtin_model):
    with serving(builtin_model, limits={"max_connections": 2}) as (url, _):
        held = [raw(url), raw(url)]
        try:
            extra = raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            extra.settimeout(HANG)
            answer = b""
            while chunk := extra.recv(65536):
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head
            assert json.loads(body)["error"]["code"] == "too_many_connections"
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: httpx2.get(url + "/health").status_code == 200, "room for a new connection", timeout=HANG)


def test_a_client_that_never_reads_its_stream_is_let_go(builtin_model):
    """It held its slot (and its generation) for as long as it kept the connection open."""
    with serving(builtin_model, limits={"write_timeout_seconds": 0.5}) as (url, runtime):
        body = json.dumps(
            {"model": "tts-1", "voice": "alloy", "input": "One more sentence. " * 200, "response_format": "pcm"}
        )
        request = (
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
        sock = raw(url, request, receive_buffer=4096)
        try:
            wait_until(
                lambda: metric(url, "voxtune_requests_in_flight") == 1, "the speech request to start", timeout=HANG
            )
            wait_until(
                lambda: metric(url, "voxtune_requests_in_flight") == 0, "the unread stream to be let go", timeout=HANG
            )
        finally:
            sock.close()


# ---- liveness under abuse -------------------------------------------------------------------------


def test_health_and_normal_requests_are_served_while_abusive_ones_run(builtin_model):
    """Huge text, long audio, a slow body and a stream never read, all at once: the event loop
    stays free, so /health and an ordinary chat are answered while they are in flight."""
    with serving(builtin_model, limits={"write_timeout_seconds": 120, "body_timeout_seconds": 120}) as (url, _):
        answers: dict = {}
        huge = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 3_400_000}]}
        long = {"model": MODEL, "messages": ask(speech_clip(590))}
        runs = [
            threading.Thread(target=lambda k=k, b=b: answers.__setitem__(k, post(url, b, key=None)))
            for k, b in (("huge", huge), ("long", long))
        ]
        slow = raw(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        speech = json.dumps(
            {"model": "tts-1", "voice": "alloy", "input": "One more sentence. " * 200, "response_format": "pcm"}
        )
        unread = raw(
            url,
            (f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: {len(speech)}\r\n\r\n{speech}").encode(),
            receive_buffer=4096,
        )
        try:
            for run in runs:
                run.start()
            wait_until(
                lambda: metric(url, "voxtune_requests_in_flight") >= 2,
                "the slow body and the unread stream",
                timeout=HANG,
            )
            assert httpx2.get(url + "/health", timeout=HANG).json()["status"] == "ok"
            normal = post(
                url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, key=None
            )
            assert normal.status_code == 200
            assert metric(url, "voxtune_requests_in_flight") >= 2  # the two abusers are still there
            for run in runs:
                run.join(HANG)
            assert error_of(answers["huge"], 400) and error_of(answers["long"], 413)
        finally:
            slow.close()
            unread.close()


# ---- shutdown --------------------------------------------------------------------------------------


def test_shutdown_lets_requests_finish_and_ends_cut_streams_properly(builtin_model):
    """SIGTERM waited a hard-coded 5 s, then cut every response: no reply, no [DONE]."""
    events: list[str] = []
    whole: dict = {}
    with serving(builtin_model, limits={"shutdown_timeout_seconds": 3.0, "max_tokens": 1800}) as (url, _):
        streamed = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 1800,
            "ignore_eos": True,
        }

        def stream() -> None:
            with httpx2.stream("POST", url + "/v1/chat/completions", json=streamed, timeout=HANG) as response:
                events.extend(line for line in response.iter_lines() if line.startswith("data: "))

        short = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "ignore_eos": True}
        reader = threading.Thread(target=stream)
        reader.start()
        wait_until(lambda: len(events) >= 3, "the stream to decode", timeout=HANG)
        asker = threading.Thread(target=lambda: whole.__setitem__("reply", post(url, short, key=None)))
        asker.start()
        wait_until(lambda: metric(url, "voxtune_requests_in_flight") >= 2, "the second request", timeout=HANG)
    # Leaving the block stopped the server as SIGTERM does.
    reader.join(HANG)
    asker.join(HANG)
    assert whole["reply"].status_code == 200  # finished within the drain
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "server_shutting_down"
    assert len(events) > 3  # it was cut while it ran, not refused


# ---- small things -----------------------------------------------------------------------------------


def test_401s_carry_a_challenge_and_head_and_trailing_slashes_behave(server):
    refused = post(server, {"model": MODEL}, key=None)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert httpx2.head(server + "/health").status_code == 200
    slashed = post(
        server, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, path="/v1/chat/completions/"
    )
    error_of(slashed, 404)  # not a redirect with an empty body


def test_an_empty_api_key_is_refused():
    with pytest.raises(ConfigError, match="an API key may not be empty"):
        from voxtune.config import load_config

        load_config(ServeConfig, None, ['api_keys=[""]'])
