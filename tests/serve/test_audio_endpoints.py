"""`POST /v1/audio/transcriptions` and `POST /v1/audio/speech` as the official client uses them:
every response and file format, segment times, streaming (deltas, chunked pcm, SSE), speed and
instructions, and each refusal as a 4xx in OpenAI's error shape."""

from __future__ import annotations

import base64
import io
import json
import re

import av
import httpx2
import numpy as np
import openai
import pytest
from openai import OpenAI

from tests.serve.conftest import KEYS
from voxtune.audio import Audio, encode, load, voices
from voxtune.audio.prosody import pitch

SAY = "Hello there. This is a test."
SPEECH = {"model": "tts-1", "voice": "alloy", "input": SAY}
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


# ---- shared clips -----------------------------------------------------------------------------


# The voice the built-in model was trained on (eSpeak NG): these tests are about the endpoints,
# not about how well the model hears other voices (the evaluation measures that).
SPEAKER = voices.EspeakBackend()


@pytest.fixture(scope="module")
def clip() -> Audio:
    """A spoken question at 16 kHz."""
    return voices.synthesize("What is seven plus five?", "en", backend=SPEAKER).resample(16000)


@pytest.fixture(scope="module")
def wav(clip) -> bytes:
    return encode(clip, "wav")


@pytest.fixture(scope="module")
def two_utterances() -> tuple[bytes, float, float]:
    """Two utterances with 1 s of digital silence between them: (wav, silence start, silence end)."""
    texts = ("What is seven plus five?", "Hello there.")
    first, second = (voices.synthesize(text, "en", backend=SPEAKER).resample(16000) for text in texts)
    silence = np.zeros(16000, np.float32)
    audio = Audio(np.concatenate([first.samples, silence, second.samples]), 16000)
    return encode(audio, "wav"), first.duration, first.duration + 1.0


def _container(audio: Audio, container: str, codec: str, rate: int) -> bytes:
    """`audio` written by FFmpeg into `container` (for the upload formats `encode` does not write)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(audio.samples[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts = audio.sample_rate, 0
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        for converted in resampler.resample(frame) + resampler.resample(None):
            output.mux(stream.encode(converted))
        output.mux(stream.encode(None))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def spoken(server) -> dict[str, bytes]:
    """SAY as wav and pcm, spoken once for the module."""
    client = OpenAI(base_url=server + "/v1", api_key=KEYS[0], max_retries=0, timeout=60)
    return {fmt: client.audio.speech.create(**SPEECH, response_format=fmt).content for fmt in ("wav", "pcm")}


def _error(error: openai.APIStatusError) -> dict:
    """The `error` object of an error response, checked to be exactly OpenAI's shape."""
    body = error.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert error.body == body["error"]  # what the SDK hands the caller
    return body["error"]


def _events(lines) -> list[dict]:
    """The JSON payloads of an SSE body's `data:` lines."""
    return [json.loads(line[len("data:") :]) for line in lines if line.startswith("data:")]


# ---- transcriptions: response formats -------------------------------------------------------


def test_json_format_gives_the_text_and_the_duration(client, wav, clip):
    result = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav))
    assert isinstance(result.text, str) and result.text.strip()
    assert "seven" in result.text.lower()
    assert result.usage.type == "duration"
    assert result.usage.seconds == pytest.approx(clip.duration, abs=0.01)


def test_text_format_is_the_bare_text(client, wav):
    text = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav), response_format="text")
    assert isinstance(text, str)
    assert not text.lstrip().startswith("{")
    assert text.strip() == client.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav)).text


def test_srt_format_has_numbered_blocks_with_comma_millis(client, wav, clip):
    srt = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav), response_format="srt")
    assert isinstance(srt, str)
    assert srt.startswith("1\n00:00:00,000 --> ")
    blocks = [b for b in srt.strip().split("\n\n") if b]
    for number, block in enumerate(blocks, start=1):
        index, times, *text = block.split("\n")
        assert index == str(number)
        assert re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", times)
        assert " ".join(text).strip()
    end = re.findall(r"--> 00:00:(\d\d),(\d{3})", srt)[-1]
    assert int(end[0]) + int(end[1]) / 1000 == pytest.approx(clip.duration, abs=0.2)


def test_vtt_format_starts_with_webvtt_and_uses_dot_millis(client, wav):
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav), response_format="vtt")
    assert isinstance(vtt, str)
    assert vtt.startswith("WEBVTT\n\n")
    cues = re.findall(r"^(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})$", vtt, flags=re.M)
    assert cues and cues[0][0] == "00:00:00.000"
    assert "," not in "".join(a + b for a, b in cues)


def test_verbose_json_gives_language_duration_and_segment_times(client, wav, clip):
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("q.wav", wav),
        response_format="verbose_json",
        timestamp_granularities=["segment"],
        language="en",
    )
    assert result.language == "english"
    assert result.duration == pytest.approx(clip.duration, abs=0.01)
    assert result.segments
    for segment in result.segments:
        assert 0 <= segment.start < segment.end <= result.duration + 1e-3
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    assert " ".join(s.text for s in result.segments if s.text) == result.text
    assert "seven" in result.text.lower()


def test_a_pause_splits_the_transcript_into_two_segments_around_it(client, two_utterances):
    data, silence_start, silence_end = two_utterances
    result = client.audio.transcriptions.create(
        model="whisper-1", file=("two.wav", data), response_format="verbose_json", timestamp_granularities=["segment"]
    )
    assert len(result.segments) == 2
    first, second = result.segments
    assert first.start < silence_start and second.end > silence_end
    # Each segment ends or starts at the silence, give or take the 0.1 s padding and a frame.
    assert silence_start - 0.5 < first.end <= silence_start + 0.15
    assert silence_end - 0.15 <= second.start < silence_end + 0.5
    assert second.start - first.end > 0.6


# ---- transcriptions: upload formats and streaming ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "writer"),
    [
        ("q.mp3", lambda a: encode(a, "mp3")),
        ("q.flac", lambda a: encode(a, "flac")),
        ("q.ogg", lambda a: encode(a, "opus")),
        ("q.opus", lambda a: encode(a, "opus")),
        ("q.webm", lambda a: _container(a, "webm", "libopus", 48000)),
        ("q.m4a", lambda a: _container(a, "ipod", "aac", 16000)),
    ],
    ids=["mp3", "flac", "ogg", "opus", "webm", "m4a"],
)
def test_each_upload_format_transcribes(client, clip, name, writer):
    result = client.audio.transcriptions.create(model="whisper-1", file=(name, writer(clip)))
    assert "seven" in result.text.lower()
    assert result.usage.seconds == pytest.approx(clip.duration, abs=0.1)


def test_stream_sends_text_deltas_then_the_whole_text(client, wav, clip):
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav), stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert deltas
    assert events[-1].type == "transcript.text.done"
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    done = events[-1]
    assert done.text and done.text == "".join(d.delta for d in deltas).strip()
    assert done.usage.seconds == pytest.approx(clip.duration, abs=0.01)
    assert done.text == client.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav)).text


# ---- transcriptions: what is refused ----------------------------------------------------------


def test_silent_audio_gives_empty_text(client):
    silent = encode(Audio(np.zeros(16000, np.float32), 16000), "wav")
    result = client.audio.transcriptions.create(model="whisper-1", file=("silence.wav", silent))
    assert result.text == ""
    assert result.usage.seconds == pytest.approx(1.0, abs=0.01)


def test_undecodable_audio_is_a_400_in_openai_shape(client):
    noise = np.random.default_rng(0).bytes(4000)
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("broken.wav", noise))
    error = _error(caught.value)
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("file:")


def test_a_form_without_a_file_is_a_400_naming_it(server):
    response = httpx2.post(
        server + "/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {KEYS[0]}"},
        files={"model": (None, "whisper-1")},
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "file"
    assert error["type"] == "invalid_request_error"


def test_an_unknown_response_format_is_a_400(client, wav):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav), response_format="xml")
    assert _error(caught.value)["param"] == "response_format"


def test_word_timestamps_are_refused_saying_only_segment_times_exist(client, wav):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1", file=("q.wav", wav), response_format="verbose_json", timestamp_granularities=["word"]
        )
    error = _error(caught.value)
    assert error["param"] == "timestamp_granularities"
    assert "word" in error["message"] and "segment" in error["message"]


def test_an_unknown_model_is_a_404(client, wav):
    with pytest.raises(openai.NotFoundError) as caught:
        client.audio.transcriptions.create(model="no-such-model", file=("q.wav", wav))
    error = _error(caught.value)
    assert error["param"] == "model" and "no-such-model" in error["message"]


def test_a_wrong_or_missing_api_key_is_a_401(server, wav):
    wrong = OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav))
    assert _error(caught.value)["code"] == "invalid_api_key"
    response = httpx2.post(
        server + "/v1/audio/transcriptions", files={"file": ("q.wav", wav), "model": (None, "whisper-1")}, timeout=30
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_unknown_language_is_a_400_streamed_or_not(client, wav, stream):
    """A bad argument is refused before the response starts, streamed or not."""
    with pytest.raises(openai.BadRequestError) as caught:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=("q.wav", wav), language="xx", stream=stream
        )
        if stream:
            list(result)
    assert "language" in _error(caught.value)["message"]


# ---- speech -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(CONTENT_TYPES))
def test_each_speech_format_has_its_content_type_and_decodes(client, spoken, fmt):
    raw = client.audio.speech.with_raw_response.create(**SPEECH, response_format=fmt)
    assert raw.status_code == 200
    assert raw.headers["content-type"].split(";")[0] == CONTENT_TYPES[fmt]
    data = raw.content
    audio = load(data, 16000, format="pcm16", rate=24000) if fmt == "pcm" else load(data, 16000, format=fmt)
    reference = load(spoken["wav"], 16000, format="wav").duration
    assert audio.duration > 1.0
    assert audio.duration == pytest.approx(reference, rel=0.15)  # the voice's timing varies a little
    assert np.abs(audio.samples).max() > 0.05  # speech, not silence


def test_speed_two_is_clearly_shorter(client, spoken):
    fast = client.audio.speech.create(**SPEECH, response_format="wav", speed=2.0).content
    normal = load(spoken["wav"], 16000, format="wav").duration
    assert load(fast, 16000, format="wav").duration < 0.75 * normal


def test_cheerful_instructions_raise_the_pitch(client, spoken):
    cheerful = client.audio.speech.create(
        **{**SPEECH, "model": "gpt-4o-mini-tts"}, response_format="wav", instructions="speak cheerfully"
    ).content
    plain = client.audio.speech.create(**{**SPEECH, "model": "gpt-4o-mini-tts"}, response_format="wav").content
    assert cheerful != plain
    median = {
        name: float(np.nanmedian(pitch(load(data, 16000, format="wav"))))
        for name, data in (("cheerful", cheerful), ("plain", plain))
    }
    assert median["cheerful"] > 1.1 * median["plain"]


def test_a_voice_may_be_given_as_an_object_with_an_id(client, spoken):
    data = client.audio.speech.create(**{**SPEECH, "voice": {"id": "alloy"}}, response_format="wav").content
    reference = load(spoken["wav"], 16000, format="wav").duration
    # The natural voice samples its timing afresh each time (as a person would): up to ~10%.
    assert load(data, 16000, format="wav").duration == pytest.approx(reference, rel=0.15)


def test_pcm_streams_in_chunks_that_add_up_to_the_whole(client, spoken):
    with client.audio.speech.with_streaming_response.create(**SPEECH, response_format="pcm") as response:
        assert response.headers["content-type"] == "audio/pcm"
        chunks = [chunk for chunk in response.iter_bytes() if chunk]
    assert len(chunks) >= 2  # one sentence at a time, not one body at the end
    streamed = b"".join(chunks)
    assert len(streamed) % 2 == 0
    assert len(streamed) == pytest.approx(len(spoken["pcm"]), rel=0.15)  # the voice's timing varies a little
    assert load(streamed, 16000, format="pcm16", rate=24000).duration > 1.0


@pytest.mark.parametrize("fmt", ["mp3", "pcm", "opus", "flac", "wav"])
def test_sse_stream_sends_base64_audio_deltas_then_usage(client, spoken, fmt):
    stream = client.audio.speech.with_streaming_response.create(**SPEECH, response_format=fmt, stream_format="sse")
    with stream as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.iter_lines())
    assert [e["type"] for e in events] == ["speech.audio.delta"] * (len(events) - 1) + ["speech.audio.done"]
    assert len(events) >= (2 if fmt == "flac" else 3)  # sentence by sentence (flac: whole, at the end)
    data = b"".join(base64.b64decode(e["audio"], validate=True) for e in events[:-1])
    audio = load(data, 16000, format="pcm16", rate=24000) if fmt == "pcm" else load(data, 16000, format=fmt)
    assert audio.duration == pytest.approx(
        load(spoken["wav"], 16000, format="wav").duration, rel=0.15
    )  # the voice varies a little
    usage = events[-1]["usage"]
    assert usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"voice": "no-such-voice"}, "voice", "no-such-voice"),
        ({"input": ""}, "input", "input"),
        ({"input": "a" * 4097}, "input", "4096"),
        ({"speed": 10}, "speed", "speed"),
        ({"response_format": "ogg"}, "response_format", "response_format"),
        ({"voice": "no-such-voice", "response_format": "pcm"}, "voice", "no-such-voice"),  # before streaming starts
    ],
    ids=["unknown-voice", "empty-input", "long-input", "speed-10", "format-ogg", "unknown-voice-pcm"],
)
def test_bad_speech_requests_are_400s_naming_the_problem(client, change, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(**{**SPEECH, **change})
    error = _error(caught.value)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]


def test_input_of_exactly_the_limit_is_accepted(client):
    text = ("Go. " * 1024)[:4096]
    stream = client.audio.speech.with_streaming_response.create(**{**SPEECH, "input": text}, response_format="pcm")
    with stream as response:
        assert response.status_code == 200
        assert next(iter(response.iter_bytes()))  # the first sentence arrives; the rest is not awaited


def test_a_body_that_is_not_json_is_a_400_without_a_pydantic_dump(server):
    response = httpx2.post(
        server + "/v1/audio/speech",
        content=b"{not json",
        timeout=30,
        headers={"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    message = body["error"]["message"]
    assert "JSON" in message
    assert "pydantic" not in message.lower() and "loc" not in message


@pytest.mark.parametrize("body", [b"[]", b'"speak"'], ids=["list", "string"])
def test_a_json_body_that_is_not_an_object_is_a_400_in_plain_words(server, body):
    response = httpx2.post(
        server + "/v1/audio/speech",
        content=body,
        timeout=30,
        headers={"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert not message.startswith(":")  # a field name, or none, before the colon
    assert "SpeechRequest" not in message  # the server's class name is no help to a caller


def test_a_voice_of_the_wrong_type_names_the_voice_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(**{**SPEECH, "voice": 123})
    error = _error(caught.value)
    assert error["param"] == "voice"  # not pydantic's union branch, "voice.str"


def test_a_sentence_that_renders_to_nothing_does_not_break_the_stream(client):
    """At speed 4 the voice renders "..." to no samples; the other sentences still arrive."""
    data = client.audio.speech.create(
        model="tts-1", voice="alloy", input="Yes. ... No.", speed=4, response_format="mp3"
    ).content
    assert load(data, 16000, format="mp3").duration > 0.2
