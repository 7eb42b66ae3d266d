"""`/v1/realtime` through the official `openai` client (`client.realtime.connect()`) against a
real server: push-to-talk and server-VAD turns, spoken and text replies, transcription-only
sessions, cancelling and barge-in, keys, limits, and error events for bad input. Every event
the server sends is checked against the SDK's own event models."""

from __future__ import annotations

import base64
import json
import re
from contextlib import contextmanager

import httpx2
import numpy as np
import pytest
from openai import OpenAI
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter
from websockets.exceptions import ConnectionClosed

from tests.serve.conftest import ADD_TOOL, KEYS, serving
from voxtune.audio import Audio, encode
from voxtune.model import tiny
from voxtune.serve.config import ServeConfig
from voxtune.serve.realtime import formats
from voxtune.serve.server import build_runtime

pytest.importorskip("websockets", reason="the openai client's realtime connection needs websockets")

EVENTS = TypeAdapter(RealtimeServerEvent)


@pytest.fixture(scope="module")
def random_model():
    """A tiny random model: its replies run to the token limit, long enough to interrupt."""
    return tiny("llama", "streaming", seed=0)


@contextmanager
def connect(url: str, key: str = "unused", **query):
    client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    with client.realtime.connect(
        model=query.pop("model", "voxtune-tiny"), extra_query=query, max_retries=0
    ) as connection:
        yield connection


def receive(connection, until: str, limit: int = 2000) -> list[dict]:
    """Raw server events up to and including the first of type `until`, each checked against
    the SDK's event models."""
    events = []
    for _ in range(limit):
        event = json.loads(connection.recv_bytes())
        EVENTS.validate_python(event)  # the SDK's own models take it
        events.append(event)
        if event["type"] == until:
            return events
    raise AssertionError(f"no {until} in {limit} events: {[e['type'] for e in events][-20:]}")


def pcm(audio: Audio) -> bytes:
    return encode(audio.resample(formats.PCM_RATE), "pcm16")


def append(connection, data: bytes, piece: int = 9600) -> None:
    for start in range(0, len(data), piece):
        connection.input_audio_buffer.append(audio=base64.b64encode(data[start : start + piece]).decode())


@pytest.fixture(scope="module")
def question():
    """A spoken question in the default English voice: one fixed render (see tests/serve/conftest.py)."""
    from voxtune.audio.voices.piper import PiperBackend

    return next(PiperBackend(seed=0).render("What is seven plus five?"))


def with_silence(audio: Audio, before: float = 0.5, after: float = 1.0) -> Audio:
    rate = audio.sample_rate
    return Audio(
        np.concatenate(
            [np.zeros(int(before * rate), np.float32), audio.samples, np.zeros(int(after * rate), np.float32)]
        ),
        rate,
    )


def test_a_push_to_talk_turn_gets_the_spoken_reply_http_chat_gives(builtin_model, question):
    with serving(builtin_model) as (url, _), connect(url) as connection:
        assert receive(connection, "session.created")[0]["session"]["audio"]["output"]["format"]["rate"] == 24000
        connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        assert receive(connection, "session.updated")[-1]["session"]["audio"]["input"]["turn_detection"] is None
        data = pcm(question)
        append(connection, data)
        connection.input_audio_buffer.commit()
        committed = receive(connection, "conversation.item.done")
        assert committed[0]["type"] == "input_audio_buffer.committed"
        connection.response.create()
        events = receive(connection, "response.done")
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        heard = formats.to_model_rate(formats.decode_wire(base64.b64encode(data).decode(), "audio/pcm"), "audio/pcm")
        part = {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(encode(heard, "wav")).decode(), "format": "wav"},
        }
        expected = (
            client.chat.completions.create(model="voxtune-tiny", messages=[{"role": "user", "content": [part]}])
            .choices[0]
            .message.content
        )
        # The turn stays in the audio store: HTTP chat refers to it by the id response.done gave.
        (stored,) = events[-1]["response"]["voxtune"]["input_audio"]
        assert stored["item_id"] == committed[0]["item_id"] and stored["id"].startswith("audio_")
        encoded = httpx2.get(url + "/metrics").text
        by_id = client.chat.completions.create(
            model="voxtune-tiny",
            messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"id": stored["id"]}}]}],
        )
        assert by_id.model_extra["input_audio"][0]["reused"] is True
        assert by_id.choices[0].message.content == expected
        assert re.search(r"^voxtune_audio_clips_encoded_total (\S+)$", encoded, re.M).group(1) == re.search(
            r"^voxtune_audio_clips_encoded_total (\S+)$", httpx2.get(url + "/metrics").text, re.M
        ).group(1)  # read from the store, not encoded again
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.done"
    assert (
        kinds.index("response.output_item.added")
        < kinds.index("response.content_part.added")
        < kinds.index("response.output_audio.delta")
    )
    transcript = next(e for e in events if e["type"] == "response.output_audio_transcript.done")["transcript"]
    assert transcript == "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    from voxtune.tags import strip_tags

    assert transcript == strip_tags(expected)  # the same model, the same audio, the same reply
    spoken = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    assert len(spoken) > 2 * 24000 * 0.3  # at least 0.3 s of 24 kHz pcm16
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["input_token_details"]["audio_tokens"] > 0
    # The context's room, after response.created: the prompt's tokens are what is used of it.
    (limits,) = next(e for e in events if e["type"] == "rate_limits.updated")["rate_limits"]
    assert limits["name"] == "tokens" and limits["limit"] == 2048
    assert limits["limit"] - limits["remaining"] == done["usage"]["input_tokens"]
    assert kinds.index("response.created") < kinds.index("rate_limits.updated") < kinds.index("response.done")


def test_server_vad_finds_the_turn_and_answers_it(builtin_model, question):
    with serving(builtin_model) as (url, _), connect(url) as connection:
        receive(connection, "session.created")
        append(connection, pcm(with_silence(question)))
        events = receive(connection, "response.done")
    kinds = [e["type"] for e in events]
    started = events[kinds.index("input_audio_buffer.speech_started")]
    stopped = events[kinds.index("input_audio_buffer.speech_stopped")]
    assert 100 <= started["audio_start_ms"] <= 500  # speech from 500 ms, 300 ms of prefix padding
    assert stopped["audio_end_ms"] >= 500 + 1000 * question.duration
    assert started["item_id"] == stopped["item_id"] == events[kinds.index("input_audio_buffer.committed")]["item_id"]
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    assert events[-1]["response"]["status"] == "completed"


def test_a_turn_s_reply_starts_at_its_pause_and_is_the_reply_it_gets_at_its_end(builtin_model):
    """With server VAD the reply starts when the speech pauses, while the silence that ends the
    turn runs: dropped when the user speaks on, used when the turn ends there, and the same
    reply, word for word, as a server that starts it when the turn has ended."""
    from voxtune.audio.voices.piper import PiperBackend

    # A fixed render (the voice's timing varies from one render to the next): the question has
    # 0.06 s of silence before its speech and 0.25 s after, so the gap between the two is about
    # 0.4 s, shorter than the 500 ms of silence that end a turn.
    question = next(PiperBackend(seed=0).render("What is seven plus five?"))
    rate = question.sample_rate
    pause = np.zeros(int(0.1 * rate), np.float32)
    turn = with_silence(Audio(np.concatenate([question.samples, pause, question.samples]), rate))
    replies, counts = {}, {}
    for early in (True, False):
        with serving(builtin_model, realtime_early_replies=early) as (url, _), connect(url) as connection:
            receive(connection, "session.created")
            append(connection, pcm(turn), piece=960)  # 20 ms pieces, as a microphone sends them
            events = receive(connection, "response.done")
            body = httpx2.get(url + "/metrics").text
        kinds = [e["type"] for e in events]
        assert kinds.count("input_audio_buffer.speech_started") == 1  # the pause did not end the turn
        replies[early] = next(e for e in events if e["type"] == "response.output_audio_transcript.done")["transcript"]
        counts[early] = {
            outcome: int(re.search(rf'early_replies_total{{outcome="{outcome}"}} (\d+)', body).group(1))
            for outcome in ("used", "dropped")
        }
    assert counts[True]["used"] == 1 and counts[True]["dropped"] >= 1  # the pause's reply gave way
    assert counts[False] == {"used": 0, "dropped": 0}
    assert replies[True] == replies[False] and replies[True]


def test_a_session_update_during_a_turn_keeps_the_turn(builtin_model, question):
    """Updating the session (not its turn detection) while the user speaks neither restarts
    turn detection (a second turn out of one) nor shifts where turns are cut."""
    data = pcm(with_silence(question))
    half = len(data) // 4 * 2  # mid-speech, on a whole sample
    with serving(builtin_model) as (url, _), connect(url) as connection:
        receive(connection, "session.created")
        append(connection, data[:half])
        connection.session.update(session={"type": "realtime", "instructions": "Answer briefly."})
        before = receive(connection, "session.updated")
        append(connection, data[half:])
        after = receive(connection, "response.done")
    events = before + after
    started = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert len(started) == len(stopped) == 1 and started[0]["item_id"] == stopped[0]["item_id"]
    assert 100 <= started[0]["audio_start_ms"] <= 500  # speech from 500 ms, as without the update
    assert after[-1]["response"]["status"] == "completed"


def test_text_replies_and_g711_input(builtin_model, question):
    with serving(builtin_model) as (url, _), connect(url) as connection:
        receive(connection, "session.created")
        connection.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}},
            }
        )
        receive(connection, "session.updated")
        mulaw = formats.encode_wire(question, "audio/pcmu")
        append(connection, mulaw, piece=1600)
        connection.input_audio_buffer.commit()
        connection.response.create()
        events = receive(connection, "response.done")
    text = next(e for e in events if e["type"] == "response.output_text.done")["text"]
    assert text and text == "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert not any(e["type"] == "response.output_audio.delta" for e in events)


def test_a_transcription_session_transcribes_each_turn(builtin_model, question):
    with serving(builtin_model) as (url, runtime):
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with client.realtime.connect(extra_query={"intent": "transcription"}, max_retries=0) as connection:
            assert receive(connection, "session.created")[0]["session"]["type"] == "transcription"
            data = pcm(with_silence(question))
            append(connection, data)
            events = receive(connection, "conversation.item.input_audio_transcription.completed")
    committed = next(e for e in events if e["type"] == "input_audio_buffer.committed")
    assert events[-1]["item_id"] == committed["item_id"] and events[-1]["transcript"]
    assert not any(e["type"].startswith("response.") for e in events)


def test_cancel_and_barge_in_end_the_response_with_the_reason(random_model, question):
    with serving(random_model, limits={"max_tokens": 400}) as (url, _), connect(url) as connection:
        receive(connection, "session.created")
        connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
        )
        receive(connection, "conversation.item.done")
        connection.response.create(response={"output_modalities": ["text"]})
        first = receive(connection, "response.done")[-1]["response"]
        assert first["status"] == "completed"  # (greedy: after it, this random model's replies run to the limit)
        connection.response.create(response={"output_modalities": ["text"]})
        receive(connection, "response.output_text.delta")
        connection.response.cancel()
        done = receive(connection, "response.done")[-1]["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
        # Barge-in: the user speaks while a reply runs (server VAD on, the default).
        connection.response.create(response={"output_modalities": ["text"]})
        receive(connection, "response.output_text.delta")
        append(connection, pcm(with_silence(question, after=0.2)))
        events = receive(connection, "response.done")
        kinds = [e["type"] for e in events]
        assert "input_audio_buffer.speech_started" in kinds
        assert (
            events[-1]["response"]["status"] == "cancelled"
            and events[-1]["response"]["status_details"]["reason"] == "turn_detected"
        )


@pytest.mark.parametrize(
    "event, code",
    [
        ("{not json", "invalid_json"),
        (json.dumps({"type": "nonsense.event"}), "invalid_event"),
        (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
        (
            json.dumps(
                {"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 10}
            ),
            "item_not_found",
        ),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "invalid_value"),
        (
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                    },
                }
            ),
            "invalid_value",
        ),
        *(
            (
                json.dumps(
                    {"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": v}}}}
                ),
                "invalid_value",
            )
            for v in (None, 7, {"id": None})
        ),
        (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    ],
)
def test_bad_events_get_an_error_event_and_the_session_goes_on(random_model, event, code):
    import websockets.sync.client as ws

    with (
        serving(random_model) as (url, _),
        ws.connect(url.replace("http://", "ws://") + "/v1/realtime?model=voxtune-tiny") as raw,
    ):
        assert json.loads(raw.recv())["type"] == "session.created"
        raw.send(event)
        error = json.loads(raw.recv())
        EVENTS.validate_python(error)
        assert error["type"] == "error" and error["error"]["code"] == code and error["error"]["message"]
        raw.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "still here"}}))
        assert json.loads(raw.recv())["session"]["instructions"] == "still here"


def test_keys_and_the_session_limit_close_with_a_reason(random_model):
    import websockets.sync.client as ws

    with serving(random_model, api_keys=list(KEYS), limits={"max_realtime_sessions": 1}) as (url, _):
        address = url.replace("http://", "ws://") + "/v1/realtime?model=voxtune-tiny"
        with ws.connect(address) as refused:
            assert json.loads(refused.recv())["error"]["code"] == "missing_api_key"
            with pytest.raises(ConnectionClosed):
                refused.recv()
            assert refused.close_code == 1008
        # A browser's key, in the subprotocol list.
        with ws.connect(address, subprotocols=["realtime", f"openai-insecure-api-key.{KEYS[0]}"]) as browser:
            assert browser.subprotocol == "realtime"
            assert json.loads(browser.recv())["type"] == "session.created"
            with ws.connect(address, additional_headers={"Authorization": f"Bearer {KEYS[1]}"}) as second:
                assert json.loads(second.recv())["error"]["code"] == "session_limit"
                with pytest.raises(ConnectionClosed):
                    second.recv()
                assert second.close_code == 1013


def test_a_session_outlives_the_header_deadline(random_model):
    """The HTTP header deadline closed WebSockets too, once it ran out after the upgrade."""
    import time

    with serving(random_model, limits={"header_timeout_seconds": 0.3}) as (url, _), connect(url) as connection:
        receive(connection, "session.created")
        time.sleep(0.8)
        connection.session.update(session={"type": "realtime", "instructions": "still open"})
        assert receive(connection, "session.updated")[-1]["session"]["instructions"] == "still open"


def test_an_idle_timeout_commits_the_silence_and_answers(random_model):
    with serving(random_model, limits={"max_tokens": 8}) as (url, _), connect(url) as connection:
        receive(connection, "session.created")
        connection.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 1000}}},
            }
        )
        receive(connection, "session.updated")
        append(connection, pcm(Audio(np.zeros(24000 * 2, np.float32), 24000)))  # 2 s of silence
        events = receive(connection, "response.done")
    kinds = [e["type"] for e in events]
    triggered = events[kinds.index("input_audio_buffer.timeout_triggered")]
    assert triggered["audio_end_ms"] - triggered["audio_start_ms"] >= 1000
    assert "input_audio_buffer.speech_started" not in kinds
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")


def test_a_hundred_sessions_at_once_are_served_or_refused_and_leave_nothing_behind(random_model):
    """32 are served (the limit), the rest are told why and closed; once all close the sessions
    gauge is 0, and a second hundred costs no more memory than the first (nothing kept)."""
    import gc
    import re
    import threading

    import httpx2
    import websockets.sync.client as ws

    def resident_mib() -> float:
        gc.collect()
        return int(re.search(r"^VmRSS:\s+(\d+)", open("/proc/self/status").read(), re.M).group(1)) / 1024

    def sessions(url: str) -> int:
        body = httpx2.get(url + "/metrics").text
        return int(float(re.search(r"^voxtune_realtime_sessions (\S+)$", body, re.M).group(1)))

    def a_hundred(address: str, url: str) -> list[str]:
        first: list[str] = []
        sockets: list = []
        lock = threading.Lock()

        def open_one() -> None:
            connection = ws.connect(address, open_timeout=60)
            event = json.loads(connection.recv(timeout=60))
            with lock:
                sockets.append(connection)
                first.append(event["type"] if event["type"] != "error" else event["error"]["code"])

        threads = [threading.Thread(target=open_one) for _ in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sessions(url) == 32
        for connection in sockets:
            connection.close()
        for _ in range(400):
            if sessions(url) == 0:
                break
            threading.Event().wait(0.05)
        assert sessions(url) == 0
        return first

    with serving(random_model) as (url, _):
        address = url.replace("http://", "ws://") + "/v1/realtime?model=voxtune-tiny"
        first = a_hundred(address, url)
        assert sorted(set(first)) == ["session.created", "session_limit"] and first.count("session.created") == 32
        after_first = resident_mib()
        a_hundred(address, url)
        assert resident_mib() - after_first < 30  # the first hundred left nothing that grows


def test_truncating_keeps_what_the_user_heard_in_the_context(builtin_model, question):
    with serving(builtin_model) as (url, _), connect(url) as connection:
        receive(connection, "session.created")
        connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        receive(connection, "session.updated")
        append(connection, pcm(question))
        connection.input_audio_buffer.commit()
        connection.response.create()
        events = receive(connection, "response.done")
        item = events[-1]["response"]["output"][0]
        spoken_ms = (
            1000
            * sum(len(base64.b64decode(e["delta"])) for e in events if e["type"] == "response.output_audio.delta")
            / 48000
        )
        connection.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=int(spoken_ms) + 500)
        assert receive(connection, "error")[-1]["error"]["param"] == "audio_end_ms"  # past the audio: refused
        connection.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=10)
        assert receive(connection, "conversation.item.truncated")[-1]["audio_end_ms"] == 10
        connection.conversation.item.retrieve(item_id=item["id"])
        retrieved = receive(connection, "conversation.item.retrieved")[-1]["item"]
    assert item["content"][0]["transcript"]  # it said something...
    assert retrieved["content"][0]["transcript"] == ""  # ...but the user heard none of it


def test_tools_and_tool_results_reach_the_prompt(random_model):
    tool = {
        "type": "function",
        "name": "add",
        "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    }
    with serving(random_model, limits={"max_tokens": 4}) as (url, _), connect(url) as connection:
        receive(connection, "session.created")
        user = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "add 7 and 5"}]}
        connection.conversation.item.create(item=user)
        receive(connection, "conversation.item.done")
        connection.response.create(response={"output_modalities": ["text"], "conversation": "none"})
        plain = receive(connection, "response.done")[-1]["response"]["usage"]["input_tokens"]
        connection.session.update(session={"type": "realtime", "tools": [tool]})
        receive(connection, "session.updated")
        connection.conversation.item.create(
            item={"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a": 7, "b": 5}'}
        )
        connection.conversation.item.create(item={"type": "function_call_output", "call_id": "call_1", "output": "12"})
        receive(connection, "conversation.item.done")
        receive(connection, "conversation.item.done")
        connection.response.create(response={"output_modalities": ["text"]})
        done = receive(connection, "response.done")[-1]["response"]
    assert done["status"] in ("completed", "incomplete")
    assert done["usage"]["input_tokens"] > plain + 30  # the tool, the call and its result are in the prompt


def test_a_spoken_turn_calls_a_tool_and_the_reply_reads_its_result(tool_model, question):
    with serving(tool_model) as (url, _), connect(url) as connection:
        receive(connection, "session.created")
        session = {"type": "realtime", "tools": [ADD_TOOL], "audio": {"input": {"turn_detection": None}}}
        connection.session.update(session=session)
        receive(connection, "session.updated")
        append(connection, pcm(question))
        connection.input_audio_buffer.commit()
        receive(connection, "conversation.item.done")
        connection.response.create()
        events = receive(connection, "response.done")
        (call,) = events[-1]["response"]["output"]
        assert call["type"] == "function_call" and call["name"] == "add"
        assert json.loads(call["arguments"]) == {"a": 7, "b": 5}
        arguments = next(e for e in events if e["type"] == "response.function_call_arguments.done")
        assert arguments["call_id"] == call["call_id"] and arguments["arguments"] == call["arguments"]
        # The call joins the conversation as OpenAI announces it; no message item was opened for it.
        added = [e["item"] for e in events if e["type"] == "conversation.item.added"]
        assert [item["type"] for item in added] == ["function_call"] and added[0]["call_id"] == call["call_id"]
        assert "response.content_part.added" not in [e["type"] for e in events]
        result = {"type": "function_call_output", "call_id": call["call_id"], "output": "12"}
        connection.conversation.item.create(item=result)
        receive(connection, "conversation.item.done")
        connection.response.create()
        reply = receive(connection, "response.done")
    assert next(e for e in reply if e["type"] == "response.output_audio_transcript.done")["transcript"] == "twelve."
    assert any(e["type"] == "response.output_audio.delta" for e in reply)


def test_a_client_that_stops_reading_is_let_go(random_model):
    """A socket whose sends never complete (its client reads nothing, its buffers are full):
    after the write timeout the session hangs up instead of waiting for ever. (Filling real
    loopback buffers takes megabytes of audio; the HTTP write timeout is tested that way.)"""
    import asyncio

    from voxtune.serve.bridge import Drain
    from voxtune.serve.realtime.session import Session

    class Unread:
        """A WebSocket whose peer reads nothing: every send waits; close records its reason."""

        closed: tuple | None = None

        async def send_text(self, text: str) -> None:
            await asyncio.Event().wait()

        async def receive_text(self) -> str:
            await asyncio.Event().wait()

        async def close(self, code: int, reason: str) -> None:
            self.closed = (code, reason)

    runtime = build_runtime(ServeConfig(), random_model)
    try:
        socket = Unread()
        session = Session(socket, runtime, "voxtune-tiny", "", Drain(), 8, write_timeout=0.2)
        asyncio.run(asyncio.wait_for(session.run(), timeout=30))
    finally:
        runtime.close()
    assert socket.closed == (1008, "the client stopped reading")


def test_a_server_that_stops_closes_sessions_with_a_reason_and_stops_their_replies(random_model):
    """On SIGTERM uvicorn closes WebSockets at once with 1012 (service restart): a clean close
    with a reason; the reply that was running is stopped, nothing left decoding."""
    import threading

    from websockets.exceptions import ConnectionClosed

    closed: list[ConnectionClosed] = []
    with serving(random_model, limits={"max_tokens": 1500, "shutdown_timeout_seconds": 1.0}) as (url, runtime):
        running = threading.Event()

        def talk() -> None:
            with connect(url) as connection:
                receive(connection, "session.created")
                connection.conversation.item.create(
                    item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
                )
                receive(connection, "conversation.item.done")
                connection.response.create(response={"output_modalities": ["text"]})
                receive(connection, "response.done")  # the first reply ends by itself (see above)
                connection.response.create(response={"output_modalities": ["text"]})
                receive(connection, "response.output_text.delta")
                running.set()
                try:
                    receive(connection, "response.done")
                except ConnectionClosed as error:
                    closed.append(error)

        talker = threading.Thread(target=talk)
        talker.start()
        assert running.wait(60)
    talker.join(60)  # leaving the block stopped the server as SIGTERM does
    assert closed and closed[0].rcvd is not None and closed[0].rcvd.code == 1012
    for _ in range(100):  # the engine drops a cancelled row at its next step
        if runtime.engine.active == 0:
            break
        threading.Event().wait(0.02)
    assert runtime.engine.active == 0
