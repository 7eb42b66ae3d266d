"""`POST /v1/chat/completions`: text and audio in, text or text + speech out, whole or streamed.

A spoken reply is the model's text rendered by the voice backend sentence by sentence, in the
language and style the model chose (`voxtune.infer.choose_voice`); while streaming, each
sentence's audio is sent as soon as the sentence is complete. The reply's text is kept in the
audio store under `message.audio.id` for later turns.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from voxtune.audio import encode, voices
from voxtune.audio.encode import PCM16_RATE
from voxtune.errors import InputError
from voxtune.infer.audio_store import new_audio_id
from voxtune.infer.engine import Completion
from voxtune.infer.runtime import PreparedChat, Runtime
from voxtune.infer.spoken_reply import SpokenText, choose_voice, render_reply
from voxtune.infer.tools import parse_tool_calls
from voxtune.model.generation import SamplingParams
from voxtune.serve.bridge import ClientGone, Pending, ShuttingDown, cancel_all
from voxtune.serve.errors import APIError, from_validation_error, read_json
from voxtune.serve.messages import parse_messages
from voxtune.tags import strip_tags

logger = logging.getLogger(__name__)

PCM_PIECE_SECONDS = 0.5  # streamed audio goes out in pieces of about this length


class AudioRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    voice: str | dict
    format: Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields voxtune reads; other OpenAI fields (user, metadata, store...) are accepted and
    ignored, as a client may send them whatever the server. Types are strict, as OpenAI's are:
    "stream": "yes" or "max_tokens": "16" is a 400, not a coercion."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    messages: list[Any] = Field(min_length=1)  # checked by voxtune.serve.messages
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioRequest | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None  # SamplingParams checks its range
    n: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    logprobs: bool | None = None
    ignore_eos: bool = False  # as vLLM: decode to the token limit whatever comes (benchmarks)


def voice_name(voice: str | dict) -> str:
    """The voice a request names: a string, or {"id": ...} for a custom voice."""
    name = voice.get("id") if isinstance(voice, dict) else voice
    if not isinstance(name, str):
        raise APIError(400, "audio.voice must be a string or {'id': <voice>}", param="audio.voice")
    try:
        voices.default_backend().resolve_voice(name)  # unknown voices fail now, not after generating
    except voices.VoiceError as error:
        raise APIError(400, str(error), param="audio.voice", code="invalid_value") from None
    return name


def sampling(request: ChatRequest, max_tokens: int) -> SamplingParams:
    """The sampling parameters of a request, checked against the server's token limit."""
    if request.n not in (None, 1):
        raise APIError(400, "n: only one choice per request is supported (n=1)", param="n")
    if request.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if request.tool_choice not in (None, "none") and not request.tools:
        raise APIError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > 4:
        raise APIError(400, "stop: at most 4 stop sequences", param="stop")
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked > max_tokens:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{field} is {asked}; this server allows at most {max_tokens}", param=field)
    # Greedy unless asked: the small models voxtune serves answer best that way.
    return SamplingParams(
        max_new_tokens=asked or max_tokens,
        temperature=request.temperature or 0.0,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=stops,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
    )


async def chat_completions(
    request: Request, runtime: Runtime, model_id: str, max_tokens: int, check_model: Callable[[str], None]
) -> Response:
    """Answer one chat completion request (the route body)."""
    try:
        body = ChatRequest.model_validate(await read_json(request))
    except ValidationError as error:
        raise from_validation_error(error) from None
    check_model(body.model)
    modalities = body.modalities or ["text"]
    speak = "audio" in modalities
    if speak and body.audio is None:
        raise APIError(400, "audio: required when modalities include 'audio' (give voice and format)", param="audio")
    audio = body.audio if speak else None
    if audio is not None and body.stream and audio.format != "pcm16":
        raise APIError(
            400,
            f"audio.format: '{audio.format}' is not supported when stream=true; use 'pcm16'",
            param="audio.format",
        )
    voice = voice_name(audio.voice) if audio is not None else None
    params = sampling(body, max_tokens)
    owner = request.scope["state"]["owner"]
    asked = body.max_completion_tokens or body.max_tokens
    conversation = parse_messages(body.messages)
    prepared: PreparedChat = await asyncio.to_thread(
        runtime.prepare_chat,
        conversation,
        owner,
        tools=body.tools,
        tool_choice=body.tool_choice,
        reply_tokens=params.max_new_tokens if asked else 1,
    )
    example = prepared.example
    assert example is not None  # prepare_chat tokenises the conversation
    if not asked:  # as long as the context allows, up to the limit
        room = runtime.reply_room(example)
        if room is not None and 0 < room < params.max_new_tokens:
            params.max_new_tokens = room
    drain = request.app.state.drain
    main = Pending(runtime.engine, example, params, drain)
    asks = [
        Pending(runtime.engine, q, SamplingParams(max_new_tokens=4), drain)
        for q in (runtime.voice_prompts(prepared) if speak else [])
    ]
    reply = _Reply(runtime, body, model_id, owner, prepared, voice)
    if body.stream:
        return StreamingResponse(reply.stream(main, asks), media_type="text/event-stream")
    try:
        completion = await main.result(request)
        heard = await _heard(asks, request)
    except ClientGone:
        cancel_all(asks)
        return Response(status_code=499)  # nobody reads it
    except ShuttingDown:
        cancel_all(asks)
        raise APIError(
            503,
            "the server is shutting down; retry",
            type="server_error",
            code="server_shutting_down",
            headers={"Retry-After": "1"},
        ) from None
    return JSONResponse(await reply.whole(completion, heard))


class _Reply:
    """Builds the response objects of one request."""

    def __init__(
        self, runtime: Runtime, body: ChatRequest, model_id: str, owner: str, prepared: PreparedChat, voice: str | None
    ) -> None:
        self.runtime, self.body, self.model_id, self.owner, self.prepared, self.voice = (
            runtime,
            body,
            model_id,
            owner,
            prepared,
            voice,
        )
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())

    def _usage(self, completion: Completion) -> dict:
        audio = completion.prompt_audio_tokens
        return {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            "prompt_tokens_details": {
                "audio_tokens": audio,
                "text_tokens": completion.prompt_tokens - audio,
                "cached_tokens": 0,
            },
            # Speech is rendered from the text by the voice, so every reply token is text.
            "completion_tokens_details": {
                "audio_tokens": 0,
                "text_tokens": completion.completion_tokens,
                "reasoning_tokens": 0,
            },
        }

    def _input_audio(self) -> list[dict]:
        """voxtune's extension: the ids of the request's user clips, for later turns."""
        return [{"id": c.id, "expires_at": c.expires_at, "reused": c.reused} for c in self.prepared.clips]

    def _finish_reason(self, completion: Completion, calls: list) -> str:
        if calls:
            return "tool_calls"
        return "length" if completion.finish_reason == "length" else "stop"

    async def _speak(self, text: str, heard: list[str], voice: str, fmt: str) -> bytes | None:
        spoken = strip_tags(text)
        if not spoken:
            return None
        language, style = choose_voice(text, *heard)
        audio, _ = await asyncio.to_thread(render_reply, spoken, language, voice, style)
        return await asyncio.to_thread(encode, audio, fmt)

    async def whole(self, completion: Completion, heard: list[str]) -> dict:
        """The non-streamed response."""
        text, calls = parse_tool_calls(completion.text) if self.body.tools else (completion.text, [])
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        if self.voice is not None and self.body.audio is not None:  # a spoken reply: both are given
            data = await self._speak(text, heard, self.voice, self.body.audio.format)
            if data is not None:
                entry = self.runtime.remember_reply(self.owner, completion.text)
                message["content"] = None
                message["audio"] = {
                    "id": entry.id,
                    "data": base64.b64encode(data).decode(),
                    "transcript": strip_tags(text),
                    "expires_at": entry.expires_at,
                }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": self._finish_reason(completion, calls),
                    "logprobs": None,
                }
            ],
            "usage": self._usage(completion),
            "input_audio": self._input_audio(),
        }

    @staticmethod
    def _event(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _chunk(self, delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        return self._event(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **extra,
            }
        )

    async def stream(self, main: Pending, asks: list[Pending]) -> AsyncIterator[str]:
        """The streamed response, as Server-Sent Events. An error after the first event goes
        into the stream (the status is sent by then), as OpenAI does, and the stream ends
        with [DONE] as a finished one does (a server that stops cuts it so too)."""
        try:
            async for event in self._events(main, asks):
                yield event
        except ShuttingDown:
            yield self._event(
                {
                    "error": {
                        "message": "the server is shutting down; the reply was cut short",
                        "type": "server_error",
                        "param": None,
                        "code": "server_shutting_down",
                    }
                }
            )
            yield "data: [DONE]\n\n"
        except Exception as error:  # noqa: BLE001 - reported to the client in the stream
            if not isinstance(error, InputError):
                logger.exception("streamed chat completion failed")
            kind = "invalid_request_error" if isinstance(error, InputError) else "server_error"
            yield self._event(
                {"error": {"message": str(error) or type(error).__name__, "type": kind, "param": None, "code": None}}
            )
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the stream ended: nothing goes on generating
            main.cancel()
            cancel_all(asks)

    async def _events(self, main: Pending, asks: list[Pending]) -> AsyncIterator[str]:
        """The chunks: text pieces as they settle, or transcript pieces and each finished
        sentence's pcm16; then the finish reason, the usage when asked, and [DONE]."""
        # The reply's audio id goes out first; its text is stored once the reply is whole.
        audio_id = new_audio_id() if self.voice is not None else None
        yield self._chunk(
            {"role": "assistant", "content": "" if audio_id is None else None}, input_audio=self._input_audio()
        )
        heard: list[str] | None = None
        speech = SpokenText()
        tools = bool(self.body.tools)
        pieces: list[str] = []
        while True:
            kind, value = await main.next()
            if kind == "error":
                raise value
            if kind == "piece":
                pieces.append(value)
                if tools:  # a tool call is only known whole: hold the text to the end
                    continue
                if audio_id is None:
                    yield self._chunk({"content": value})
                    continue
                delta, ready = speech.feed(value)
                if delta:
                    yield self._chunk({"audio": {"id": audio_id, "transcript": delta}})
                if ready:
                    if heard is None:
                        heard = await _heard(asks)
                    async for chunk in self._audio_chunks(ready, speech.raw, heard, audio_id):
                        yield chunk
                continue
            completion: Completion = value
            break
        text, calls = parse_tool_calls(completion.text) if tools else (completion.text, [])
        if tools and text and audio_id is None:
            yield self._chunk({"content": text})
        if calls:
            yield self._chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
        if audio_id is not None:
            delta, rest = speech.finish(text)
            if delta:
                yield self._chunk({"audio": {"id": audio_id, "transcript": delta}})
            if rest:
                if heard is None:
                    heard = await _heard(asks)
                async for chunk in self._audio_chunks(rest, completion.text, heard, audio_id):
                    yield chunk
            entry = self.runtime.remember_reply(self.owner, completion.text, audio_id)
            yield self._chunk({"audio": {"expires_at": entry.expires_at}})  # the last audio chunk: only the expiry
        yield self._chunk({}, self._finish_reason(completion, calls))
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield self._event(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model_id,
                    "choices": [],
                    "usage": self._usage(completion),
                }
            )
        yield "data: [DONE]\n\n"

    async def _audio_chunks(self, text: str, reply: str, heard: list[str], audio_id: str) -> AsyncIterator[str]:
        """`text` (sentences of `reply`, the raw text so far) spoken, as pcm16 pieces."""
        assert self.voice is not None  # only a spoken reply has audio
        language, style = choose_voice(reply, *heard)
        audio, _ = await asyncio.to_thread(render_reply, text, language, self.voice, style)
        pcm = encode(audio, "pcm16")  # 24 kHz s16le
        step = int(PCM_PIECE_SECONDS * PCM16_RATE) * 2
        for start in range(0, len(pcm), step):
            yield self._chunk({"audio": {"id": audio_id, "data": base64.b64encode(pcm[start : start + step]).decode()}})


async def _heard(asks: list[Pending], request: Request | None = None) -> list[str]:
    """The answers to the questions that choose a spoken reply's voice (`Runtime.voice_prompts`)."""
    return [(await ask.result(request)).text for ask in asks]
