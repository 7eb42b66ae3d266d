"""One Realtime API session over a WebSocket: its configuration, its audio buffer and turn
detection, its conversation, and the responses it streams (OpenAI's GA event names).

Client events are read one at a time; a response runs as a task of its own, so audio keeps
arriving (and can interrupt it) while it speaks. With server VAD, the reply to a turn starts
when its speech pauses, while the silence that would end the turn runs (an early reply: decoded
up to its first sentence, which is spoken, ready to send): if the turn ends there, the reply is
already under way (the model reads the turn up to where the speech ended); if the user speaks
again, it is dropped. A reply is the model's text, streamed as
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
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voxtune.audio import Audio, encode
from voxtune.audio.features import SAMPLE_RATE
from voxtune.errors import InputError, echo
from voxtune.infer.runtime import Runtime
from voxtune.serve.bridge import Drain
from voxtune.serve.realtime import formats
from voxtune.serve.realtime.protocol import EventError, check_session, conversation_item, default_session, merge, new_id
from voxtune.serve.realtime.response import Response
from voxtune.serve.realtime.vad import EAGERNESS_SILENCE_MS, TurnDetector

logger = logging.getLogger(__name__)

MAX_APPEND_CHARS = 15 * (1 << 20)  # base64 in one input_audio_buffer.append, as OpenAI's limit


class ClientStalled(Exception):
    """The client has stopped reading the session's events."""


@dataclass
class EarlyReplies:
    """Replies started at a pause in the speech, over all sessions: used when the turn ended
    there, dropped when the user spoke on (or the conversation changed meanwhile)."""

    used: int = 0
    dropped: int = 0


class Session:
    """The state of one connection and the handling of its events."""

    def __init__(
        self,
        socket: WebSocket,
        runtime: Runtime,
        model_id: str,
        owner: str,
        drain: Drain,
        max_tokens: int,
        kind: str = "realtime",
        write_timeout: float = 30.0,
        early_replies: EarlyReplies | None = None,
    ) -> None:
        self.socket, self.runtime, self.model_id, self.owner, self.drain = socket, runtime, model_id, owner, drain
        self.max_tokens = max_tokens
        self.write_timeout = write_timeout  # a client that stops reading is let go
        self.config = default_session(model_id, kind)
        self.items: list[dict[str, Any]] = []
        self.audio: dict[str, Audio] = {}  # user audio items' clips (16 kHz)
        # What the model reads of a detected turn: up to where its speech ended, without the
        # silence that confirmed the end (the same clip whether the reply started early or not).
        self.spoken: dict[str, Audio] = {}
        self.wav: dict[str, str] = {}  # the same as base64 WAV, made once: every response reads them
        self.buffer = np.zeros(0, np.float32)  # wire samples since the last commit
        self.buffer_start_ms = 0  # where the buffer begins in the session's audio
        self.turns: TurnDetector | None = None
        self.turn_item: str | None = None  # the item id a detected turn will commit to
        self.turn_start_ms: int | None = None
        self.idle_from_ms: int | None = None  # since when (session audio ms) nothing has happened
        self.response: asyncio.Task | None = None
        self.response_cancelled: str | None = None  # why the running response is being stopped
        self.sending = asyncio.Lock()
        self.early_replies = early_replies  # where they are counted; None: replies start at the turn's end
        # (speech end ms, reply) started at a pause; dropped by any client event but audio, since
        # that may change what the reply reads (the session, the conversation, the buffer).
        self.early: tuple[int, Response] | None = None
        self._configure_turns()

    # ---- sending ---------------------------------------------------------------------------------

    async def send(self, kind: str, **fields: Any) -> None:
        """Send one server event; raises `ClientStalled` when the client has not read for
        `write_timeout` seconds."""
        event = {"type": kind, "event_id": new_id("event"), **fields}
        async with self.sending:
            try:
                async with asyncio.timeout(self.write_timeout):
                    await self.socket.send_text(json.dumps(event, ensure_ascii=False))
            except TimeoutError:
                raise ClientStalled from None

    async def hang_up(self, reason: str) -> None:
        """Close the connection (1008, `reason`), without waiting on a client that does not read."""
        try:
            async with asyncio.timeout(1.0):
                await self.socket.close(code=1008, reason=reason)
        except (TimeoutError, RuntimeError):
            pass

    async def error(
        self, message: str, *, code: str | None = None, param: str | None = None, event_id: str | None = None
    ) -> None:
        await self.send(
            "error",
            error={
                "type": "invalid_request_error",
                "code": code,
                "message": message,
                "param": param,
                "event_id": event_id,
            },
        )

    # ---- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the client leaves."""
        try:
            await self.send("session.created", session=self.config)
            while True:
                text = await self.socket.receive_text()
                await self.handle(text)
        except WebSocketDisconnect:
            pass
        except ClientStalled:
            await self.hang_up("the client stopped reading")
        finally:
            self._drop_early()
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
            if event["type"] != "input_audio_buffer.append":
                self._drop_early()  # the session, the conversation or the buffer may change
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
        merge(config, {k: v for k, v in update.items() if k not in ("type", "object", "id")})
        check_session(config)
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
        settings = (detection.get("threshold", 0.5), detection.get("prefix_padding_ms", 300), silence)
        if self.turns is not None and self.turns.settings == settings:
            return  # the same detection: a turn under way goes on
        # A new detector counts its time from where the session's audio is now (its turns cut
        # the buffer by session time).
        heard_ms = self.buffer_start_ms + round(1000 * len(self.buffer) / formats.rate_of(self.input_format))
        self.turns = TurnDetector(*settings, start_ms=heard_ms)

    @property
    def input_format(self) -> str:
        return self.config["audio"]["input"]["format"]["type"]

    # ---- the input audio buffer --------------------------------------------------------------------

    async def append(self, event: dict) -> None:
        data = event.get("audio")
        if not isinstance(data, str):
            raise EventError("input_audio_buffer.append needs 'audio' (base64)", param="audio")
        if len(data) > MAX_APPEND_CHARS:
            raise EventError(
                f"one append may carry at most {MAX_APPEND_CHARS} base64 characters", code="too_large", param="audio"
            )
        samples = formats.decode_wire(data, self.input_format)
        rate = formats.rate_of(self.input_format)
        if (len(self.buffer) + len(samples)) / rate > self.runtime.max_audio_seconds:
            raise EventError(
                f"the input audio buffer would pass {self.runtime.max_audio_seconds:g} s: commit or clear it",
                code="too_large",
                param="audio",
            )
        self.buffer = np.concatenate([self.buffer, samples])
        if self.turns is None:
            return
        for turn in await asyncio.to_thread(self.turns.feed, formats.to_model_rate(samples, self.input_format).samples):
            if turn.kind == "started":
                self.turn_item, self.turn_start_ms = new_id("item"), turn.ms
                await self.send("input_audio_buffer.speech_started", audio_start_ms=turn.ms, item_id=self.turn_item)
                detection = self.config["audio"]["input"]["turn_detection"]
                if self.response is not None and not self.response.done() and detection.get("interrupt_response", True):
                    await self._stop_response("turn_detected")
            elif turn.kind == "paused":
                self._start_early(turn.ms)
            elif turn.kind == "resumed":
                self._drop_early()
            else:
                item_id = self.turn_item or new_id("item")
                await self.send("input_audio_buffer.speech_stopped", audio_end_ms=turn.ms, item_id=item_id)
                await self._commit(
                    item_id, end_ms=turn.ms, start_ms=self.turn_start_ms, speech_end_ms=turn.speech_end_ms
                )
                self.idle_from_ms = turn.ms
                # Taken only now: a commit that fails (the client gone) leaves it to be dropped.
                early = self._take_early(turn.speech_end_ms)
                if self._answers_turns:
                    await self._start_response({}, early)
        await self._check_idle()

    @property
    def _answers_turns(self) -> bool:
        """Whether a detected turn gets a reply without the client asking."""
        detection = self.config["audio"]["input"].get("turn_detection") or {}
        return bool(detection.get("create_response", True)) and self.config["type"] == "realtime"

    def _start_early(self, speech_end_ms: int) -> None:
        """The speech has paused at `speech_end_ms`: start the reply the turn gets if it ends here."""
        self._drop_early()
        busy = self.response is not None and not self.response.done()
        if self.early_replies is None or not self._answers_turns or busy or self.turn_item is None:
            return
        item_id = self.turn_item
        reply = Response(self, {})
        clip = self._slice(self.turn_start_ms, speech_end_ms)
        reply.start_model([*self.items, self._user_item(item_id)], {item_id: clip}, ahead=True)
        self.early = (speech_end_ms, reply)

    def _take_early(self, speech_end_ms: int | None) -> Response | None:
        """The early reply, if it read this very turn (anything else since would have dropped it)."""
        if self.early is None or self.early_replies is None:
            return None
        if self.early[0] != speech_end_ms:
            self._drop_early()
            return None
        reply, self.early = self.early[1], None
        self.early_replies.used += 1
        return reply

    def _drop_early(self) -> None:
        if self.early is not None and self.early_replies is not None:
            self.early[1].stop_model()
            self.early = None
            self.early_replies.dropped += 1

    async def _check_idle(self) -> None:
        """With `idle_timeout_ms`: the user has been silent that long since the last turn or
        reply ended, so the silence is committed and answered (a nudge), as OpenAI does."""
        detection = self.config["audio"]["input"].get("turn_detection") or {}
        idle = detection.get("idle_timeout_ms")
        turns = self.turns
        if turns is None or turns.speaking or (self.response is not None and not self.response.done()):
            return  # no turn detection, or busy
        if not idle or self.config["type"] != "realtime":
            return
        if self.idle_from_ms is None:
            self.idle_from_ms = turns.heard_ms
        if turns.heard_ms - self.idle_from_ms < idle:
            return
        item_id, start, end = new_id("item"), self.idle_from_ms, turns.heard_ms
        await self.send("input_audio_buffer.timeout_triggered", audio_start_ms=start, audio_end_ms=end, item_id=item_id)
        await self._commit(item_id, end_ms=end, start_ms=start)
        self.idle_from_ms = end
        if detection.get("create_response", True):
            await self._start_response({})

    async def commit(self, event: dict) -> None:
        if not len(self.buffer):
            raise EventError(
                "the input audio buffer is empty: append audio before committing",
                code="input_audio_buffer_commit_empty",
            )
        await self._commit(self.turn_item or new_id("item"), end_ms=None)

    async def clear(self, event: dict) -> None:
        self._drop_early()
        self.buffer_start_ms += round(1000 * len(self.buffer) / formats.rate_of(self.input_format))
        self.buffer = np.zeros(0, np.float32)
        if self.turns is not None:
            self.turns.reset()
        await self.send("input_audio_buffer.cleared")

    def _index(self, ms: int) -> int:
        """The buffer's sample at `ms` of the session's audio (within the buffer)."""
        rate = formats.rate_of(self.input_format)
        return max(0, min(len(self.buffer), (ms - self.buffer_start_ms) * rate // 1000))

    def _slice(self, start_ms: int | None, end_ms: int) -> Audio:
        """The buffer from `start_ms` (None: its start) to `end_ms`, at the model's rate."""
        cut = self._index(end_ms)
        first = 0 if start_ms is None else min(self._index(start_ms), cut)
        return formats.to_model_rate(self.buffer[first:cut], self.input_format)

    def _user_item(self, item_id: str) -> dict[str, Any]:
        """A user audio item (its clip in `self.audio`)."""
        return {
            "id": item_id,
            "type": "message",
            "object": "realtime.item",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }

    async def _commit(
        self, item_id: str, end_ms: int | None, start_ms: int | None = None, speech_end_ms: int | None = None
    ) -> None:
        """The buffer (from `start_ms` up to `end_ms` of the session's audio, when given: a
        detected turn and its prefix padding) becomes a user item; the model reads it up to
        `speech_end_ms` when given."""
        rate = formats.rate_of(self.input_format)
        if speech_end_ms is not None:
            self.spoken[item_id] = self._slice(start_ms, speech_end_ms)
        cut = len(self.buffer) if end_ms is None else self._index(end_ms)
        first = 0 if start_ms is None else min(self._index(start_ms), cut)
        samples, self.buffer = self.buffer[first:cut], self.buffer[cut:]
        self.buffer_start_ms += round(1000 * cut / rate)
        self.turn_item = None
        previous = self.items[-1]["id"] if self.items else None
        item = self._user_item(item_id)
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
            await self.send(
                "conversation.item.input_audio_transcription.failed",
                item_id=item["id"],
                content_index=0,
                error={"type": "invalid_request_error", "code": None, "message": str(error), "param": None},
            )
            return
        item["content"][0]["transcript"] = transcript
        if transcript:
            await self.send(
                "conversation.item.input_audio_transcription.delta",
                item_id=item["id"],
                content_index=0,
                delta=transcript,
            )
        # `language` is voxtune's addition: the language the model heard.
        await self.send(
            "conversation.item.input_audio_transcription.completed",
            item_id=item["id"],
            content_index=0,
            transcript=transcript,
            usage={"type": "duration", "seconds": round(clip.duration, 3)},
            language=language,
        )

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
        item = conversation_item(item, self)
        previous = event.get("previous_item_id")
        at = len(self.items) if previous in (None, "") else (0 if previous == "root" else self._find(previous) + 1)
        self.items.insert(at, item)
        before = self.items[at - 1]["id"] if at else None
        await self.send("conversation.item.added", item=item, previous_item_id=before)
        await self.send("conversation.item.done", item=item, previous_item_id=before)

    async def item_retrieve(self, event: dict) -> None:
        item = {
            k: v
            for k, v in copy.deepcopy(self.items[self._find(event.get("item_id"))]).items()
            if not k.startswith("_")
        }
        if item["id"] in self.audio and item["content"]:
            clip = self.audio[item["id"]]
            item["content"][0]["audio"] = base64.b64encode(formats.encode_wire(clip, self.input_format)).decode()
        await self.send("conversation.item.retrieved", item=item)

    async def item_delete(self, event: dict) -> None:
        item = self.items.pop(self._find(event.get("item_id")))
        self.audio.pop(item["id"], None)
        self.spoken.pop(item["id"], None)
        self.wav.pop(item["id"], None)
        await self.send("conversation.item.deleted", item_id=item["id"])

    async def item_truncate(self, event: dict) -> None:
        item = self.items[self._find(event.get("item_id"))]
        end_ms = event.get("audio_end_ms")
        if (
            item.get("role") != "assistant"
            or not item.get("content")
            or item["content"][0].get("type") != "output_audio"
        ):
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
            raise EventError(
                "a response is already in progress: cancel it or wait for response.done",
                code="conversation_already_has_active_response",
            )
        await self._start_response(overrides)

    async def response_cancel(self, event: dict) -> None:
        if self.response is None or self.response.done():
            raise EventError("no response is in progress", code="response_cancel_not_active")
        await self._stop_response("client_cancelled")

    async def _start_response(self, overrides: dict, early: Response | None = None) -> None:
        """Run a response (`early`: one whose model was started at the turn's pause)."""
        self._drop_early()
        self.response_cancelled = None
        self.response = asyncio.create_task(self._respond(early or Response(self, overrides)))

    async def _respond(self, response: Response) -> None:
        try:
            await response.run()
        except ClientStalled:  # its events pile up unread: the session ends
            await self.hang_up("the client stopped reading")
        except WebSocketDisconnect:
            pass  # the client left mid-reply: nobody to tell; run() ends the session
        except RuntimeError:
            # Starlette's answer to a send after the close; anything else is a bug to see.
            if WebSocketState.DISCONNECTED not in (self.socket.client_state, self.socket.application_state):
                raise

    async def _stop_response(self, reason: str) -> None:
        self.response_cancelled = reason
        if self.response is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.response), timeout=30)
            except TimeoutError:
                self.response.cancel()

    def chat_messages(
        self, instructions: str, items: list[dict], clips: dict[str, Audio] | None = None
    ) -> tuple[list[dict], list[str]]:
        """The conversation as OpenAI chat messages (what `Runtime.prepare_chat` reads), and the
        item id of each audio part, in reading order; `clips` gives the audio of items not
        committed yet (an early reply's turn)."""
        clips = clips or {}
        messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
        audio_items: list[str] = []
        for item in items:
            kind = item["type"]
            if kind == "function_call":
                call = {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                }
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "content": item["output"], "tool_call_id": item["call_id"]})
            elif item["role"] == "user":
                parts = []
                for part in item["content"]:
                    if part["type"] == "input_text":
                        parts.append({"type": "text", "text": part["text"]})
                    elif item["id"] in clips:
                        data = base64.b64encode(encode(clips[item["id"]], "wav")).decode()
                        parts.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
                        audio_items.append(item["id"])
                    elif item["id"] in self.audio:
                        if item["id"] not in self.wav:
                            clip = self.spoken[item["id"]] if item["id"] in self.spoken else self.audio[item["id"]]
                            self.wav[item["id"]] = base64.b64encode(encode(clip, "wav")).decode()
                        parts.append(
                            {"type": "input_audio", "input_audio": {"data": self.wav[item["id"]], "format": "wav"}}
                        )
                        audio_items.append(item["id"])
                if parts:
                    messages.append({"role": "user", "content": parts})
            else:
                text = "".join(p.get("text") or p.get("transcript") or "" for p in item["content"])
                messages.append({"role": item["role"], "content": text})
        return messages, audio_items


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
