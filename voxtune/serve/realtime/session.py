"""One Realtime API session over a WebSocket: its configuration, its audio buffer and turn
detection, its conversation, and the responses it streams (OpenAI's GA event names).

Client events are read one at a time; a response runs as a task of its own, so audio keeps
arriving (and can interrupt it) while it speaks. A reply is the model's text, streamed as
`response.output_audio_transcript.delta` while each finished sentence's speech follows as
`response.output_audio.delta` (or `response.output_text.delta` in text mode). Bad events get an
`error` event; the session goes on.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import uuid
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from voxtune.audio import Audio, encode
from voxtune.audio.features import SAMPLE_RATE
from voxtune.errors import InputError, echo
from voxtune.infer.runtime import Runtime
from voxtune.infer.spoken_reply import choose_voice, render_reply
from voxtune.infer.tools import parse_tool_calls
from voxtune.model.generation import SamplingParams
from voxtune.serve.bridge import Drain, Pending, ShuttingDown, cancel_all
from voxtune.serve.realtime import formats
from voxtune.serve.realtime.vad import EAGERNESS_SILENCE_MS, TurnDetector
from voxtune.tags import strip_tags

logger = logging.getLogger(__name__)

MAX_APPEND_CHARS = 15 * (1 << 20)  # base64 in one input_audio_buffer.append, as OpenAI's limit
PCM_PIECE_BYTES = formats.PCM_RATE * 2 // 2  # 0.5 s of 24 kHz pcm16 per output_audio.delta


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def default_session(model_id: str, kind: str = "realtime") -> dict[str, Any]:
    """A new session's configuration, as `session.created` shows it."""
    turn_detection = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
                      "create_response": True, "interrupt_response": True, "idle_timeout_ms": None}  # fmt: skip
    audio_input = {"format": {"type": "audio/pcm", "rate": formats.PCM_RATE}, "transcription": None,
                   "noise_reduction": None, "turn_detection": turn_detection}  # fmt: skip
    if kind == "transcription":
        return {"type": "transcription", "object": "realtime.transcription_session", "id": _id("sess"),
                "audio": {"input": {**audio_input, "transcription": {"model": model_id}}}, "include": []}  # fmt: skip
    return {
        "type": "realtime", "object": "realtime.session", "id": _id("sess"), "model": model_id,
        "output_modalities": ["audio"], "instructions": "", "tools": [], "tool_choice": "auto",
        "max_output_tokens": "inf",
        "audio": {"input": audio_input,
                  "output": {"format": {"type": "audio/pcm", "rate": formats.PCM_RATE}, "voice": "alloy", "speed": 1.0}},
    }  # fmt: skip


class EventError(InputError):
    """A client event that cannot be done; it becomes an `error` event."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


class Session:
    """The state of one connection and the handling of its events."""

    def __init__(self, socket: WebSocket, runtime: Runtime, model_id: str, owner: str, drain: Drain,
                 max_tokens: int, kind: str = "realtime") -> None:  # fmt: skip
        self.socket, self.runtime, self.model_id, self.owner, self.drain = socket, runtime, model_id, owner, drain
        self.max_tokens = max_tokens
        self.config = default_session(model_id, kind)
        self.items: list[dict[str, Any]] = []
        self.audio: dict[str, Audio] = {}  # user audio items' clips (16 kHz)
        self.buffer = np.zeros(0, np.float32)  # wire samples since the last commit
        self.buffer_start_ms = 0  # where the buffer begins in the session's audio
        self.turns: TurnDetector | None = None
        self.turn_item: str | None = None  # the item id a detected turn will commit to
        self.turn_start_ms: int | None = None
        self.idle_from_ms: int | None = None  # since when (session audio ms) nothing has happened
        self.response: asyncio.Task | None = None
        self.response_cancelled: str | None = None  # why the running response is being stopped
        self.sending = asyncio.Lock()
        self._configure_turns()

    # ---- sending ---------------------------------------------------------------------------------

    async def send(self, kind: str, **fields: Any) -> None:
        event = {"type": kind, "event_id": _id("event"), **fields}
        async with self.sending:
            await self.socket.send_text(json.dumps(event, ensure_ascii=False))

    async def error(self, message: str, *, code: str | None = None, param: str | None = None,
                    event_id: str | None = None) -> None:  # fmt: skip
        await self.send("error", error={"type": "invalid_request_error", "code": code, "message": message,
                                        "param": param, "event_id": event_id})  # fmt: skip

    # ---- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the client leaves."""
        await self.send("session.created", session=self.config)
        try:
            while True:
                text = await self.socket.receive_text()
                await self.handle(text)
        except WebSocketDisconnect:
            pass
        finally:
            if self.response is not None:
                self.response.cancel()

    async def handle(self, text: str) -> None:
        """One client event; what goes wrong is an `error` event."""
        event_id = None
        try:
            try:
                event = json.loads(text)
            except json.JSONDecodeError as error:
                raise EventError(f"the event is not valid JSON ({error})", code="invalid_json") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise EventError("an event must be a JSON object with a 'type'", code="invalid_event")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = HANDLERS.get(event["type"])
            if handler is None:
                raise EventError(f"unknown event type {echo(event['type'])}", code="invalid_event", param="type")
            await handler(self, event)
        except EventError as error:
            await self.error(str(error), code=error.code, param=error.param, event_id=event_id)
        except InputError as error:
            await self.error(str(error), code="invalid_value", event_id=event_id)

    # ---- session -----------------------------------------------------------------------------------

    async def session_update(self, event: dict) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            raise EventError("session.update needs a 'session' object", param="session")
        kind = update.get("type", self.config["type"])
        if kind not in ("realtime", "transcription"):
            raise EventError("session.type must be 'realtime' or 'transcription'", param="session.type")
        config = default_session(self.model_id, kind) if kind != self.config["type"] else copy.deepcopy(self.config)
        _merge(config, {k: v for k, v in update.items() if k not in ("type", "object", "id")})
        _check_session(config)
        self.config = config
        self._configure_turns()
        await self.send("session.updated", session=self.config)

    def _configure_turns(self) -> None:
        detection = self.config["audio"]["input"].get("turn_detection")
        if detection is None:
            self.turns = None
            return
        silence = detection.get("silence_duration_ms", 500)
        if detection.get("type") == "semantic_vad":
            silence = EAGERNESS_SILENCE_MS[detection.get("eagerness") or "auto"]
        self.turns = TurnDetector(detection.get("threshold", 0.5), detection.get("prefix_padding_ms", 300), silence)

    @property
    def input_format(self) -> str:
        return self.config["audio"]["input"]["format"]["type"]

    # ---- the input audio buffer --------------------------------------------------------------------

    async def append(self, event: dict) -> None:
        data = event.get("audio")
        if not isinstance(data, str):
            raise EventError("input_audio_buffer.append needs 'audio' (base64)", param="audio")
        if len(data) > MAX_APPEND_CHARS:
            raise EventError(f"one append may carry at most {MAX_APPEND_CHARS} base64 characters", code="too_large",
                             param="audio")  # fmt: skip
        samples = formats.decode_wire(data, self.input_format)
        rate = formats.rate_of(self.input_format)
        if (len(self.buffer) + len(samples)) / rate > self.runtime.max_audio_seconds:
            raise EventError(f"the input audio buffer would pass {self.runtime.max_audio_seconds:g} s: commit or clear it",
                             code="too_large", param="audio")  # fmt: skip
        self.buffer = np.concatenate([self.buffer, samples])
        if self.turns is None:
            return
        for turn in await asyncio.to_thread(self.turns.feed, formats.to_model_rate(samples, self.input_format).samples):
            if turn.kind == "started":
                self.turn_item, self.turn_start_ms = _id("item"), turn.ms
                await self.send("input_audio_buffer.speech_started", audio_start_ms=turn.ms, item_id=self.turn_item)
                detection = self.config["audio"]["input"]["turn_detection"]
                if self.response is not None and not self.response.done() and detection.get("interrupt_response", True):
                    await self._stop_response("turn_detected")
            else:
                item_id = self.turn_item or _id("item")
                await self.send("input_audio_buffer.speech_stopped", audio_end_ms=turn.ms, item_id=item_id)
                await self._commit(item_id, end_ms=turn.ms, start_ms=self.turn_start_ms)
                self.idle_from_ms = turn.ms
                if self.config["audio"]["input"]["turn_detection"].get("create_response", True) and self.config["type"] == "realtime":
                    await self._start_response({})
        await self._check_idle()

    async def _check_idle(self) -> None:
        """With `idle_timeout_ms`: the user has been silent that long since the last turn or
        reply ended, so the silence is committed and answered (a nudge), as OpenAI does."""
        detection = self.config["audio"]["input"].get("turn_detection") or {}
        idle = detection.get("idle_timeout_ms")
        busy = self.turns is None or self.turns.speaking or (self.response is not None and not self.response.done())
        if not idle or busy or self.config["type"] != "realtime":
            return
        if self.idle_from_ms is None:
            self.idle_from_ms = self.turns.heard_ms
        if self.turns.heard_ms - self.idle_from_ms < idle:
            return
        item_id, start, end = _id("item"), self.idle_from_ms, self.turns.heard_ms
        await self.send("input_audio_buffer.timeout_triggered", audio_start_ms=start, audio_end_ms=end, item_id=item_id)
        await self._commit(item_id, end_ms=end, start_ms=start)
        self.idle_from_ms = end
        if detection.get("create_response", True):
            await self._start_response({})

    async def commit(self, event: dict) -> None:
        if not len(self.buffer):
            raise EventError("the input audio buffer is empty: append audio before committing", code="input_audio_buffer_commit_empty")
        await self._commit(self.turn_item or _id("item"), end_ms=None)

    async def clear(self, event: dict) -> None:
        self.buffer_start_ms += round(1000 * len(self.buffer) / formats.rate_of(self.input_format))
        self.buffer = np.zeros(0, np.float32)
        if self.turns is not None:
            self.turns.reset()
        await self.send("input_audio_buffer.cleared")

    async def _commit(self, item_id: str, end_ms: int | None, start_ms: int | None = None) -> None:
        """The buffer (from `start_ms` up to `end_ms` of the session's audio, when given: a
        detected turn and its prefix padding) becomes a user item."""
        rate = formats.rate_of(self.input_format)

        def index(ms: int) -> int:
            return max(0, min(len(self.buffer), (ms - self.buffer_start_ms) * rate // 1000))

        cut = len(self.buffer) if end_ms is None else index(end_ms)
        first = 0 if start_ms is None else min(index(start_ms), cut)
        samples, self.buffer = self.buffer[first:cut], self.buffer[cut:]
        self.buffer_start_ms += round(1000 * cut / rate)
        self.turn_item = None
        previous = self.items[-1]["id"] if self.items else None
        item = {"id": item_id, "type": "message", "object": "realtime.item", "status": "completed", "role": "user",
                "content": [{"type": "input_audio", "transcript": None}]}  # fmt: skip
        self.items.append(item)
        self.audio[item_id] = formats.to_model_rate(samples, self.input_format)
        await self.send("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        await self.send("conversation.item.added", item=item, previous_item_id=previous)
        await self.send("conversation.item.done", item=item, previous_item_id=previous)
        if self.config["audio"]["input"].get("transcription"):
            asyncio.create_task(self._transcribe(item))

    async def _transcribe(self, item: dict) -> None:
        """The user's words of an audio item (input transcription, after the commit)."""
        clip = self.audio[item["id"]]
        language = None
        try:
            if len(clip) >= SAMPLE_RATE // 10:
                words = await asyncio.to_thread(self.runtime.transcribe, clip)
                transcript, language = words.text, words.language
            else:
                transcript = ""
        except InputError as error:
            await self.send("conversation.item.input_audio_transcription.failed", item_id=item["id"], content_index=0,
                            error={"type": "invalid_request_error", "code": None, "message": str(error), "param": None})  # fmt: skip
            return
        item["content"][0]["transcript"] = transcript
        if transcript:
            await self.send("conversation.item.input_audio_transcription.delta", item_id=item["id"], content_index=0, delta=transcript)
        # `language` is voxtune's addition: the language the model heard.
        await self.send("conversation.item.input_audio_transcription.completed", item_id=item["id"], content_index=0,
                        transcript=transcript, usage={"type": "duration", "seconds": round(clip.duration, 3)},
                        language=language)  # fmt: skip

    # ---- the conversation --------------------------------------------------------------------------

    def _find(self, item_id: Any) -> int:
        for index, item in enumerate(self.items):
            if item["id"] == item_id:
                return index
        raise EventError(f"no item {echo(item_id)} in this conversation", code="item_not_found", param="item_id")

    async def item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise EventError("conversation.item.create needs an 'item' object", param="item")
        item = _conversation_item(item, self)
        previous = event.get("previous_item_id")
        at = len(self.items) if previous in (None, "") else (0 if previous == "root" else self._find(previous) + 1)
        self.items.insert(at, item)
        before = self.items[at - 1]["id"] if at else None
        await self.send("conversation.item.added", item=item, previous_item_id=before)
        await self.send("conversation.item.done", item=item, previous_item_id=before)

    async def item_retrieve(self, event: dict) -> None:
        item = {k: v for k, v in copy.deepcopy(self.items[self._find(event.get("item_id"))]).items() if not k.startswith("_")}
        if item["id"] in self.audio and item["content"]:
            clip = self.audio[item["id"]]
            item["content"][0]["audio"] = base64.b64encode(formats.encode_wire(clip, self.input_format)).decode()
        await self.send("conversation.item.retrieved", item=item)

    async def item_delete(self, event: dict) -> None:
        item = self.items.pop(self._find(event.get("item_id")))
        self.audio.pop(item["id"], None)
        await self.send("conversation.item.deleted", item_id=item["id"])

    async def item_truncate(self, event: dict) -> None:
        item = self.items[self._find(event.get("item_id"))]
        end_ms = event.get("audio_end_ms")
        if item.get("role") != "assistant" or not item.get("content") or item["content"][0].get("type") != "output_audio":
            raise EventError("only an assistant's audio item can be truncated", param="item_id")
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            raise EventError("audio_end_ms must be a whole number of ms, at least 0", param="audio_end_ms")
        spoken = item.setdefault("_spoken", [])  # (end ms, text) of each sentence rendered
        total = spoken[-1][0] if spoken else 0
        if end_ms > total:
            raise EventError(f"audio_end_ms {end_ms} is past the item's audio ({total} ms)", param="audio_end_ms")
        heard = " ".join(text for ms, text in spoken if ms <= end_ms)
        item["content"][0]["transcript"] = heard  # the context keeps what the user heard
        await self.send("conversation.item.truncated", item_id=item["id"], content_index=0, audio_end_ms=end_ms)

    # ---- responses ---------------------------------------------------------------------------------

    async def response_create(self, event: dict) -> None:
        if self.config["type"] != "realtime":
            raise EventError("a transcription session makes no responses", code="invalid_session_type")
        overrides = event.get("response") or {}
        if not isinstance(overrides, dict):
            raise EventError("response must be an object", param="response")
        if self.response is not None and not self.response.done() and overrides.get("conversation", "auto") != "none":
            raise EventError("a response is already in progress: cancel it or wait for response.done",
                             code="conversation_already_has_active_response")  # fmt: skip
        await self._start_response(overrides)

    async def response_cancel(self, event: dict) -> None:
        if self.response is None or self.response.done():
            raise EventError("no response is in progress", code="response_cancel_not_active")
        await self._stop_response("client_cancelled")

    async def _start_response(self, overrides: dict) -> None:
        self.response_cancelled = None
        self.response = asyncio.create_task(Response(self, overrides).run())

    async def _stop_response(self, reason: str) -> None:
        self.response_cancelled = reason
        if self.response is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.response), timeout=30)
            except TimeoutError:
                self.response.cancel()

    def chat_messages(self, instructions: str, items: list[dict]) -> list[dict]:
        """The conversation as OpenAI chat messages (what `Runtime.prepare_chat` reads)."""
        messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
        for item in items:
            kind = item["type"]
            if kind == "function_call":
                call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "content": item["output"], "tool_call_id": item["call_id"]})
            elif item["role"] == "user":
                parts = []
                for part in item["content"]:
                    if part["type"] == "input_text":
                        parts.append({"type": "text", "text": part["text"]})
                    elif item["id"] in self.audio:
                        data = base64.b64encode(encode(self.audio[item["id"]], "wav")).decode()
                        parts.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
                if parts:
                    messages.append({"role": "user", "content": parts})
            else:
                text = "".join(p.get("text") or p.get("transcript") or "" for p in item["content"])
                messages.append({"role": item["role"], "content": text})
        return messages


class Response:
    """One response: the model's reply to the conversation, streamed as events."""

    def __init__(self, session: Session, overrides: dict) -> None:
        self.session = session
        config = session.config
        self.modalities = overrides.get("output_modalities") or config["output_modalities"]
        output = {**config["audio"]["output"], **((overrides.get("audio") or {}).get("output") or {})}
        self.voice = output["voice"] if isinstance(output["voice"], str) else output["voice"].get("id", "alloy")
        self.output_format = output["format"]["type"]
        self.instructions = overrides.get("instructions", config["instructions"])
        self.tools = overrides.get("tools", config["tools"])
        self.tool_choice = overrides.get("tool_choice", config["tool_choice"])
        self.limit = overrides.get("max_output_tokens", config["max_output_tokens"])
        self.out_of_band = overrides.get("conversation") == "none"
        self.metadata = overrides.get("metadata")
        self.id = _id("resp")
        self.item_id = _id("item")
        self.audio_ms = 0
        self.asks: list[Pending] = []
        self.heard: list[str] | None = []
        self.voice_choice: tuple[str, str] | None = None

    def _response(self, status: str, output: list, usage: dict | None = None, details: dict | None = None) -> dict:
        return {"id": self.id, "object": "realtime.response", "status": status, "status_details": details,
                "output": output, "usage": usage, "metadata": self.metadata, "output_modalities": self.modalities,
                "conversation_id": None if self.out_of_band else "conv_default",
                "max_output_tokens": self.limit}  # fmt: skip

    async def run(self) -> None:
        session = self.session
        send = session.send
        await send("response.created", response=self._response("in_progress", []))
        audio = "audio" in self.modalities
        item = {"id": self.item_id, "type": "message", "object": "realtime.item", "status": "in_progress",
                "role": "assistant", "content": []}  # fmt: skip
        ids = {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}
        previous = session.items[-1]["id"] if session.items else None
        history = list(session.items)
        if not self.out_of_band:
            session.items.append(item)
        await send("response.output_item.added", response_id=self.id, output_index=0, item=item)
        await send("conversation.item.added", item=item, previous_item_id=previous)
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        await send("response.content_part.added", part=part, **ids)
        text, completion, status, reason = "", None, "completed", None
        try:
            tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
                     for t in self.tools or [] if t.get("type") == "function"]  # fmt: skip
            messages = session.chat_messages(self.instructions, history)
            if not messages:
                raise InputError("the conversation is empty: add an item before asking for a response")
            prepared = await asyncio.to_thread(session.runtime.prepare_chat, messages, session.owner,
                                               tools=tools or None, tool_choice=self.tool_choice if tools else None)  # fmt: skip
            room = session.runtime.reply_room(prepared.example) or session.max_tokens
            limit = session.max_tokens if self.limit in (None, "inf") else min(int(self.limit), session.max_tokens)
            params = SamplingParams(max_new_tokens=max(1, min(limit, room)))
            pending = Pending(session.runtime.engine, prepared.example, params, session.drain)
            # The questions that choose the spoken reply's language and style, decoded alongside.
            asks = [Pending(session.runtime.engine, q, SamplingParams(max_new_tokens=4), session.drain)
                    for q in (session.runtime.voice_prompts(prepared) if audio else [])]  # fmt: skip
            self.heard: list[str] | None = None if asks else []
            self.asks = asks
            said, spoken = "", 0
            while True:
                if session.response_cancelled:
                    pending.cancel()
                    cancel_all(asks)
                    status, reason = "cancelled", session.response_cancelled
                    break
                kind, value = await pending.next(poll=0.05)
                if kind == "error":
                    cancel_all(asks)
                    raise value
                if kind == "done":
                    completion = value
                    break
                text += value
                if tools:
                    continue  # a tool call is only known whole
                clean = strip_tags(text)
                if len(clean) > len(said) and clean.startswith(said):
                    delta = clean[len(said) :]
                    said = clean
                    if audio:
                        await send("response.output_audio_transcript.delta", delta=delta, **ids)
                    else:
                        await send("response.output_text.delta", delta=delta, **ids)
                if audio:
                    from voxtune.serve.chat import _ready_to_speak

                    ready = _ready_to_speak(said[spoken:])
                    if ready:
                        await self._speak(said[spoken : spoken + ready].strip(), text, item, ids)
                        spoken += ready
            if completion is not None:
                final, calls = parse_tool_calls(completion.text) if tools else (completion.text, [])
                clean = strip_tags(final)
                if calls:
                    await self._calls(calls, session, item, previous)
                    return
                if len(clean) > len(said) and clean.startswith(said):
                    delta = clean[len(said) :]
                    await send("response.output_audio_transcript.delta" if audio else "response.output_text.delta", delta=delta, **ids)
                    said = clean
                if audio and said[spoken:].strip():
                    await self._speak(said[spoken:].strip(), final, item, ids)
                if completion.finish_reason == "length":
                    status, reason = "incomplete", "max_output_tokens"
        except ShuttingDown:
            status, reason = "cancelled", "server_shutting_down"
        except InputError as error:
            status = "failed"
            await session.error(str(error))
        finally:
            cancel_all(self.asks)  # done already when the reply was spoken; else no longer wanted
        content = {"type": "output_audio", "transcript": strip_tags(text)} if audio else {"type": "output_text", "text": strip_tags(text)}
        item["content"] = [content]
        item["status"] = "completed" if status == "completed" else "incomplete"
        if audio:
            await send("response.output_audio.done", **ids)
            await send("response.output_audio_transcript.done", transcript=content["transcript"], **ids)
        else:
            await send("response.output_text.done", text=content["text"], **ids)
        await send("response.content_part.done", part={"type": "audio", "transcript": content["transcript"]} if audio
                   else {"type": "text", "text": content["text"]}, **ids)  # fmt: skip
        public = {k: v for k, v in item.items() if not k.startswith("_")}
        await send("response.output_item.done", response_id=self.id, output_index=0, item=public)
        await send("conversation.item.done", item=public, previous_item_id=previous)
        usage = _usage(completion) if completion is not None else None
        details = {"type": status, "reason": reason} if reason else None
        if session.turns is not None:  # the idle timeout counts from the end of the reply
            session.idle_from_ms = session.turns.heard_ms
        done = self._response(status, [public], usage, details)
        if self.voice_choice is not None:  # voxtune's addition: the language and style it answered in
            done["voxtune"] = {"language": self.voice_choice[0], "style": self.voice_choice[1]}
        await send("response.done", response=done)

    async def _speak(self, sentence: str, reply: str, item: dict, ids: dict) -> None:
        """One finished piece of the reply, spoken and sent as audio deltas, in the language and
        style the voice questions chose (asked once, before the first sentence)."""
        if self.heard is None:
            self.heard = [(await ask.result()).text for ask in self.asks]
        language, style = choose_voice(reply, *self.heard)
        self.voice_choice = (language, style)
        audio, _ = await asyncio.to_thread(render_reply, sentence, language, self.voice, style)
        data = await asyncio.to_thread(formats.encode_wire, audio, self.output_format)
        step = PCM_PIECE_BYTES if self.output_format == "audio/pcm" else formats.G711_RATE // 2
        for start in range(0, len(data), step):
            await self.session.send("response.output_audio.delta", delta=base64.b64encode(data[start : start + step]).decode(), **ids)
        self.audio_ms += round(1000 * audio.duration)
        item.setdefault("_spoken", []).append((self.audio_ms, sentence))

    async def _calls(self, calls: list[dict], session: Session, item: dict, previous: str | None) -> None:
        """A reply that calls tools: function_call items instead of the message."""
        send = session.send
        if not self.out_of_band:
            session.items.remove(item)
        output = []
        for index, call in enumerate(calls):
            function = call["function"]
            call_item = {"id": _id("item"), "type": "function_call", "object": "realtime.item", "status": "completed",
                         "call_id": call["id"], "name": function["name"], "arguments": function["arguments"]}  # fmt: skip
            if not self.out_of_band:
                session.items.append(call_item)
            common = {"response_id": self.id, "item_id": call_item["id"], "output_index": index, "call_id": call["id"]}
            await send("response.output_item.added", response_id=self.id, output_index=index, item=call_item)
            await send("response.function_call_arguments.delta", delta=function["arguments"], **common)
            await send("response.function_call_arguments.done", arguments=function["arguments"], name=function["name"], **common)
            await send("response.output_item.done", response_id=self.id, output_index=index, item=call_item)
            await send("conversation.item.done", item=call_item, previous_item_id=previous)
            output.append(call_item)
        await send("response.done", response=self._response("completed", output))


def _usage(completion: Any) -> dict:
    audio = completion.prompt_audio_tokens
    return {"total_tokens": completion.prompt_tokens + completion.completion_tokens, "input_tokens": completion.prompt_tokens,
            "output_tokens": completion.completion_tokens,
            "input_token_details": {"text_tokens": completion.prompt_tokens - audio, "audio_tokens": audio,
                                    "image_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": completion.completion_tokens, "audio_tokens": 0}}  # fmt: skip


def _merge(config: dict, update: dict) -> None:
    """`update` into `config`, nested objects merged key by key (omitted keys keep their values)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            _merge(config[key], value)
        else:
            config[key] = value


def _check_session(config: dict) -> None:
    """Raise `EventError` for a session configuration voxtune cannot serve."""
    audio = config.get("audio")
    if not isinstance(audio, dict) or not isinstance(audio.get("input"), dict):
        raise EventError("session.audio.input must be an object", param="session.audio")
    for side in ("input", "output"):
        fmt = (audio.get(side) or {}).get("format")
        if fmt is None and side == "output" and config["type"] == "transcription":
            continue
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in formats.FORMATS:
            raise EventError(f"audio.{side}.format.type must be one of {', '.join(formats.FORMATS)}", param=f"session.audio.{side}.format")
        if kind == "audio/pcm" and fmt.get("rate", formats.PCM_RATE) != formats.PCM_RATE:
            raise EventError("audio/pcm is 24000 Hz only, as OpenAI's", param=f"session.audio.{side}.format.rate")
    detection = audio["input"].get("turn_detection")
    if detection is not None:
        if not isinstance(detection, dict) or detection.get("type") not in ("server_vad", "semantic_vad"):
            raise EventError("turn_detection.type must be server_vad or semantic_vad (or turn_detection null)",
                             param="session.audio.input.turn_detection")  # fmt: skip
        threshold = detection.get("threshold", 0.5)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold < 1:
            raise EventError("turn_detection.threshold must be between 0 and 1", param="session.audio.input.turn_detection.threshold")
        idle = detection.get("idle_timeout_ms")
        if idle is not None and (not isinstance(idle, int) or isinstance(idle, bool) or idle < 0):
            raise EventError("turn_detection.idle_timeout_ms must be a whole number of ms (or null)",
                             param="session.audio.input.turn_detection.idle_timeout_ms")  # fmt: skip
        if detection.get("eagerness", "auto") not in EAGERNESS_SILENCE_MS:
            raise EventError("turn_detection.eagerness must be low, medium, high or auto",
                             param="session.audio.input.turn_detection.eagerness")  # fmt: skip
    if config["type"] == "realtime":
        modalities = config.get("output_modalities")
        if modalities not in (["audio"], ["text"]):
            raise EventError("output_modalities must be ['audio'] or ['text']", param="session.output_modalities")
        voice = audio.get("output", {}).get("voice")
        name = voice.get("id") if isinstance(voice, dict) else voice
        from voxtune.audio import voices

        try:
            voices.default_backend().resolve_voice(name)
        except voices.VoiceError as error:
            raise EventError(str(error), param="session.audio.output.voice") from None


def _conversation_item(item: dict, session: Session) -> dict:
    """A client's item, checked and completed with ids (user audio decoded into the session)."""
    kind = item.get("type", "message")
    out = {"id": item.get("id") or _id("item"), "type": kind, "object": "realtime.item", "status": "completed"}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
            raise EventError("a function_call_output item needs 'call_id' and 'output' strings", param="item")
        return {**out, "call_id": item["call_id"], "output": item["output"]}
    if kind == "function_call":
        if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
            raise EventError("a function_call item needs 'call_id', 'name' and 'arguments' strings", param="item")
        return {**out, "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
    if kind != "message" or item.get("role") not in ("user", "assistant", "system"):
        raise EventError("item.type must be message (role user, assistant or system), function_call or function_call_output",
                         param="item")  # fmt: skip
    content = []
    for index, part in enumerate(item.get("content") or []):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype in ("input_text", "text", "output_text") and isinstance(part.get("text"), str):
            content.append({"type": "input_text" if item["role"] != "assistant" else "output_text", "text": part["text"]})
        elif ptype == "input_audio" and item["role"] == "user" and isinstance(part.get("audio"), str):
            samples = formats.decode_wire(part["audio"], session.input_format)
            session.audio[out["id"]] = formats.to_model_rate(samples, session.input_format)
            content.append({"type": "input_audio", "transcript": part.get("transcript")})
        elif ptype in ("audio", "output_audio") and item["role"] == "assistant":
            content.append({"type": "output_audio", "transcript": part.get("transcript") or ""})
        else:
            raise EventError(f"item.content[{index}] is not a part this role can hold", param=f"item.content[{index}]")
    if not content:
        raise EventError("a message item needs content", param="item.content")
    return {**out, "role": item["role"], "content": content}


HANDLERS = {
    "session.update": Session.session_update,
    "input_audio_buffer.append": Session.append,
    "input_audio_buffer.commit": Session.commit,
    "input_audio_buffer.clear": Session.clear,
    "conversation.item.create": Session.item_create,
    "conversation.item.retrieve": Session.item_retrieve,
    "conversation.item.delete": Session.item_delete,
    "conversation.item.truncate": Session.item_truncate,
    "response.create": Session.response_create,
    "response.cancel": Session.response_cancel,
}
