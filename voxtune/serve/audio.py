"""`POST /v1/audio/transcriptions` and `POST /v1/audio/speech`."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Literal, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from voxtune.audio import CONTENT_TYPES, voices
from voxtune.audio.encode import StreamEncoder, normalize_format
from voxtune.audio.voices import STYLES
from voxtune.errors import InputError
from voxtune.infer.runtime import Runtime, Transcript, TranscriptionPlan
from voxtune.serve.bridge import ClientGone, Drain, Pending, ShuttingDown, cancel_all
from voxtune.serve.errors import APIError, from_validation_error, read_json
from voxtune.tags import LANGUAGES

logger = logging.getLogger(__name__)

TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
SPANS_IN_FLIGHT = 4  # spans of one recording decoded at once


# ---- transcriptions -------------------------------------------------------------------------


async def transcriptions(request: Request, runtime: Runtime, check_model: Callable[[str], None]) -> Response:
    """Transcribe an uploaded file (multipart form, as the OpenAI SDK sends it)."""
    try:
        form = await request.form()
    except Exception as error:  # noqa: BLE001 - python-multipart raises several kinds for a broken body
        raise APIError(400, f"the request is not a readable multipart form ({error})", code="invalid_form") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "file: required (the audio, as a multipart file)", param="file")
    check_model(_field(form, "model", required=True))
    response_format = _field(form, "response_format") or "json"
    if response_format not in TRANSCRIPT_FORMATS:
        raise APIError(400, f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}", param="response_format")
    granularities = form.getlist("timestamp_granularities[]") or form.getlist("timestamp_granularities")
    for granularity in granularities:
        if granularity == "word":
            raise APIError(
                400,
                "timestamp_granularities: this model gives segment times, not word times",
                param="timestamp_granularities",
            )
        if granularity != "segment":
            raise APIError(400, "timestamp_granularities must be 'segment'", param="timestamp_granularities")
    if granularities and response_format != "verbose_json":
        raise APIError(
            400, "timestamp_granularities needs response_format verbose_json", param="timestamp_granularities"
        )
    temperature = _number(_field(form, "temperature"), "temperature", 0.0, 1.0)
    stream = (_field(form, "stream") or "false").lower() == "true"
    if stream and response_format not in ("json", "text"):
        raise APIError(400, "stream: only with response_format json or text", param="stream")
    language = _field(form, "language") or None
    if language is not None and language not in LANGUAGES:
        raise APIError(
            400, f"language must be an ISO-639-1 code this model knows ({', '.join(LANGUAGES)})", param="language"
        )
    data = await upload.read()
    # The format is read from the bytes: a file named .wav that holds mp3 is still mp3.
    audio = await asyncio.to_thread(lambda: runtime.decode(data, where="file", allow_silent=True))
    plan = await asyncio.to_thread(runtime.plan_transcription, audio, language, temperature=temperature)
    drain = request.app.state.drain
    if stream:
        return StreamingResponse(_stream_transcript(runtime, plan, drain), media_type="text/event-stream")
    replies = []
    try:
        async for kind, value in _decode_spans(runtime, plan, drain, request):
            if kind == "reply":
                replies.append(value)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    except ShuttingDown:
        raise APIError(
            503,
            "the server is shutting down; retry",
            type="server_error",
            code="server_shutting_down",
            headers={"Retry-After": "1"},
        ) from None
    return _transcript_response(plan.transcript(replies), response_format)


async def _decode_spans(
    runtime: Runtime, plan: TranscriptionPlan, drain: Drain, request: Request | None = None
) -> AsyncIterator[tuple[str, str]]:
    """("piece", text) as each span's text settles, span after span, and ("reply", text) when
    a span is done. At most SPANS_IN_FLIGHT spans decode at once, so one long recording
    shares the engine with other requests instead of filling its queue."""
    waiting = list(plan.conversations)
    running: list[Pending] = []
    try:
        while waiting or running:
            while waiting and len(running) < SPANS_IN_FLIGHT:
                running.append(Pending(runtime.engine, waiting.pop(0), plan.params, drain))
            while True:
                kind, value = await running[0].next(request)
                if kind == "error":
                    raise value
                if kind == "done":
                    break
                yield "piece", value
            running.pop(0)
            yield "reply", value.text
    finally:
        cancel_all(running)


async def _stream_transcript(runtime: Runtime, plan: TranscriptionPlan, drain: Drain) -> AsyncIterator[str]:
    """`transcript.text.delta` events (tags left out, spans joined by a space), then `.done`
    whose text is the deltas joined."""
    anything_sent = False
    raw, sent, replies = "", "", []  # the current span's text so far, and how much of it went out
    try:
        async for kind, value in _decode_spans(runtime, plan, drain):
            text = plan.read(raw + value if kind == "piece" else value)[0]
            if len(text) > len(sent) and text.startswith(sent):
                space = " " if anything_sent and not sent else ""
                yield _sse({"type": "transcript.text.delta", "delta": space + text[len(sent) :]})
                sent, anything_sent = text, True
            if kind == "piece":
                raw += value
            else:
                replies.append(value)
                raw, sent = "", ""
    except ShuttingDown:
        yield _sse(
            {
                "type": "error",
                "error": {
                    "message": "the server is shutting down; the transcript was cut short",
                    "type": "server_error",
                    "code": "server_shutting_down",
                },
            }
        )
        return
    except Exception as error:  # noqa: BLE001 - the 200 is sent: the error goes in the stream
        if not isinstance(error, InputError):
            logger.exception("transcription failed after the response started")
        kind = "invalid_request_error" if isinstance(error, InputError) else "server_error"
        yield _sse({"type": "error", "error": {"message": str(error), "type": kind}})
        return
    transcript = plan.transcript(replies)
    yield _sse({"type": "transcript.text.done", "text": transcript.text, "usage": _duration_usage(transcript)})


def _duration_usage(transcript: Transcript) -> dict:
    return {"type": "duration", "seconds": round(transcript.duration, 3)}


def _transcript_response(transcript: Transcript, response_format: str) -> Response:
    if response_format == "json":
        return JSONResponse({"text": transcript.text, "usage": _duration_usage(transcript)})
    if response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    if response_format == "verbose_json":
        return JSONResponse(
            {
                "task": "transcribe",
                "language": _language_name(transcript.language),
                "duration": round(transcript.duration, 3),
                "text": transcript.text,
                "segments": [
                    {
                        "id": s.id,
                        "seek": 0,
                        "start": s.start,
                        "end": s.end,
                        "text": s.text,
                        "tokens": [],
                        "temperature": 0.0,
                        "avg_logprob": None,
                        "compression_ratio": None,
                        "no_speech_prob": None,
                    }
                    for s in transcript.segments
                ],
                "usage": _duration_usage(transcript),
            }
        )
    return PlainTextResponse(_subtitles(transcript, vtt=response_format == "vtt"), media_type="text/plain")


def _language_name(code: str | None) -> str | None:
    """OpenAI names the language in full, lower case ("english")."""
    if code is None:
        return None
    names = {language.code: language.name for language in voices.list_languages()}
    return names.get(code, code).split(" (")[0].lower()  # "English (Great Britain)" -> "english"


def _subtitles(transcript: Transcript, *, vtt: bool) -> str:
    def stamp(seconds: float) -> str:
        millis = int(round(seconds * 1000))
        hours, millis = divmod(millis, 3_600_000)
        minutes, millis = divmod(millis, 60_000)
        secs, millis = divmod(millis, 1000)
        return f"{hours:02d}:{minutes:02d}:{secs:02d}{'.' if vtt else ','}{millis:03d}"

    blocks = [
        ("" if vtt else f"{number}\n") + f"{stamp(s.start)} --> {stamp(s.end)}\n{s.text}\n"
        for number, s in enumerate((s for s in transcript.segments if s.text), start=1)
    ]
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(blocks)


@overload
def _field(form, name: str, *, required: Literal[True]) -> str: ...
@overload
def _field(form, name: str, *, required: bool = False) -> str | None: ...
def _field(form, name: str, *, required: bool = False) -> str | None:
    value = form.get(name)
    if value is None and required:
        raise APIError(400, f"{name}: required", param=name)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"{name} must be a text field", param=name)
    return value


def _number(value: str | None, name: str, low: float, high: float) -> float:
    if value is None or value == "":
        return low
    try:
        number = float(value)
    except ValueError:
        raise APIError(400, f"{name} must be a number", param=name) from None
    if not low <= number <= high:
        raise APIError(400, f"{name} must be between {low:g} and {high:g}", param=name)
    return number


# ---- speech -----------------------------------------------------------------------------------


class SpeechRequest(BaseModel):
    """OpenAI's speech request; `language` is voxtune's addition (default English). Types are
    strict, as OpenAI's are: "speed": true or "1.0" is a 400, not a number."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    input: str = Field(min_length=1)
    voice: str | dict
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] = "audio"
    language: str = voices.DEFAULT_LANGUAGE


# Words of an instruction that ask for each style besides its name (neutral: none).
_CUES = {
    "neutral": (),
    "happy": ("cheerful", "joyful", "upbeat", "friendly"),
    "sad": ("somber", "melancholy"),
    "angry": ("furious", "annoyed"),
    "calm": ("soothing", "relaxed", "gentle"),
    "excited": ("enthusiastic", "energetic"),
    "whisper": ("quiet", "softly"),
}
STYLE_CUES = {style: _CUES[style] for style in STYLES if style != "neutral"}  # every style has its cues


def style_from_instructions(instructions: str | None) -> str:
    """The speaking style an instruction asks for, by the style names and their common words
    ("speak cheerfully" -> happy); neutral when it names none."""
    text = (instructions or "").lower()
    for style, cues in STYLE_CUES.items():
        if any(cue in text for cue in (style, *cues)):
            return style
    return "neutral"


async def speech(request: Request, runtime: Runtime, check_model: Callable[[str], None], max_chars: int) -> Response:
    """Speak the input text in the requested voice and format, whole or streamed."""
    try:
        body = SpeechRequest.model_validate(await read_json(request))
    except ValidationError as error:
        raise from_validation_error(error) from None
    check_model(body.model)
    if len(body.input) > max_chars:
        raise APIError(400, f"input is {len(body.input)} characters; the limit is {max_chars}", param="input")
    voice = body.voice.get("id") if isinstance(body.voice, dict) else body.voice
    if not isinstance(voice, str):
        raise APIError(400, "voice must be a string or {'id': <voice>}", param="voice")
    fmt = normalize_format(body.response_format)
    style = style_from_instructions(body.instructions)
    # Checks every argument now (a bad voice or language is a 400 before any audio is sent).
    try:
        sentences = voices.render(body.input, body.language, voice, style, body.speed)
    except voices.VoiceError as error:
        param = {voices.UnknownVoiceError: "voice", voices.UnknownLanguageError: "language"}.get(type(error), "input")
        raise APIError(400, str(error), param=param, code="invalid_value") from None
    media_type = "text/event-stream" if body.stream_format == "sse" else CONTENT_TYPES[fmt]
    tokens = len(runtime.model.tokenizer(body.input, add_special_tokens=False)["input_ids"])
    return StreamingResponse(_speech_stream(sentences, fmt, body.stream_format == "sse", tokens), media_type=media_type)


async def _speech_stream(sentences: Iterator, fmt: str, sse: bool, input_tokens: int) -> AsyncIterator[bytes | str]:
    """Each sentence encoded as soon as the voice renders it: raw bytes of one stream in `fmt`,
    or `speech.audio.delta` events and a closing `speech.audio.done`."""
    encoder = StreamEncoder(fmt)

    def out(data: bytes) -> bytes | str:
        return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}) if sse else data

    try:
        while (audio := await asyncio.to_thread(next, sentences, None)) is not None:
            if data := await asyncio.to_thread(encoder.feed, audio):
                yield out(data)
        if data := await asyncio.to_thread(encoder.close):
            yield out(data)
    except Exception as error:  # noqa: BLE001 - the 200 is sent: an SSE client hears of it in the stream
        logger.exception("speech failed after the response started")
        if sse:
            yield _sse(
                {"type": "error", "error": {"message": str(error) or type(error).__name__, "type": "server_error"}}
            )
        return
    if sse:
        yield _sse(
            {
                "type": "speech.audio.done",
                "usage": {"input_tokens": input_tokens, "output_tokens": 0, "total_tokens": input_tokens},
            }
        )


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
