"""One response of a Realtime session: the model's reply to the conversation, streamed as
events (`response.created` first, `response.done` last, whatever happens between)."""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any

from voxtune.audio import Audio
from voxtune.errors import InputError
from voxtune.infer.spoken_reply import SpokenText, choose_voice, render_reply
from voxtune.infer.tools import parse_tool_calls
from voxtune.model.generation import SamplingParams
from voxtune.serve.bridge import Pending, ShuttingDown, cancel_all
from voxtune.serve.errors import APIError
from voxtune.serve.messages import parse_messages
from voxtune.serve.realtime import formats
from voxtune.serve.realtime.protocol import new_id
from voxtune.tags import strip_tags

if TYPE_CHECKING:
    from voxtune.serve.realtime.session import Session

PCM_PIECE_BYTES = formats.PCM_RATE  # per output_audio.delta: 0.5 s of 24 kHz pcm16 (2 bytes a sample)


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
        self.id = new_id("resp")
        self.item_id = new_id("item")
        self.audio_ms = 0
        self.model: asyncio.Task | None = None  # starts the model on the conversation
        self.pending: Pending | None = None
        self.asks: list[Pending] = []
        self.heard: list[str] | None = []
        self.function_tools: list[dict] = []
        self.stored: list[dict] = []  # the user clips read, as the audio store keeps them
        self.rate_limits: list[dict] = []
        self.backlog: list[tuple[str, Any]] = []  # the model's events read before `run`
        self.running = False  # whether `run` has begun
        self.ahead: tuple[str, Audio] | None = None  # the first sentence, spoken before `run`
        self.voice_choice: tuple[str, str] | None = None

    def _response(self, status: str, output: list, usage: dict | None = None, details: dict | None = None) -> dict:
        return {
            "id": self.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": output,
            "usage": usage,
            "metadata": self.metadata,
            "output_modalities": self.modalities,
            "conversation_id": None if self.out_of_band else "conv_default",
            "max_output_tokens": self.limit,
        }

    async def run(self) -> None:
        session = self.session
        send = session.send
        await send("response.created", response=self._response("in_progress", []))
        audio = "audio" in self.modalities
        item: dict[str, Any] = {
            "id": self.item_id,
            "type": "message",
            "object": "realtime.item",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        ids = {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}
        previous = session.items[-1]["id"] if session.items else None
        history = list(session.items)

        async def open_message() -> None:
            """Announce the reply's message item (and its content part)."""
            if not self.out_of_band:
                session.items.append(item)
            await send("response.output_item.added", response_id=self.id, output_index=0, item=item)
            await send("conversation.item.added", item=item, previous_item_id=previous)
            part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
            await send("response.content_part.added", part=part, **ids)

        # With tools offered, the reply is a message or function calls, known only when it is
        # whole: its message item is announced then, if it is one.
        opened = not any(t.get("type") == "function" for t in self.tools or [])
        if opened:
            await open_message()
        text, completion, status, reason = "", None, "completed", None
        failure: dict | None = None
        try:
            self.running = True  # an early reply stops decoding ahead: its events are run's now
            if self.model is None:
                self.start_model(history)
            assert self.model is not None
            await self.model
            if self.rate_limits:
                await send("rate_limits.updated", rate_limits=self.rate_limits)
            pending, asks, tools = self.pending, self.asks, self.function_tools
            assert pending is not None
            speech = SpokenText()
            delta_event = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
            while True:
                if session.response_cancelled:
                    pending.cancel()
                    cancel_all(asks)
                    status, reason = "cancelled", session.response_cancelled
                    break
                kind, value = self.backlog.pop(0) if self.backlog else await pending.next(poll=0.05)
                if kind == "error":
                    cancel_all(asks)
                    raise value
                if kind == "done":
                    completion = value
                    break
                text += value
                if tools:
                    continue  # a tool call is only known whole
                delta, ready = speech.feed(value)
                if delta:
                    await send(delta_event, delta=delta, **ids)
                if audio and ready:
                    await self._speak(ready, text, item, ids)
            if completion is not None:
                final, calls = parse_tool_calls(completion.text) if tools else (completion.text, [])
                if calls:
                    await self._calls(calls, session, previous)
                    return
                if not opened:
                    await open_message()
                    opened = True
                delta, rest = speech.finish(final)
                if delta:
                    await send(delta_event, delta=delta, **ids)
                if audio and rest and not session.response_cancelled:
                    await self._speak(rest, final, item, ids)
                if session.response_cancelled:  # while the reply was being spoken
                    status, reason = "cancelled", session.response_cancelled
                elif completion.finish_reason == "length":
                    status, reason = "incomplete", "max_output_tokens"
        except ShuttingDown:
            status = "failed"
            failure = {"type": "server_error", "code": "server_shutting_down", "message": "the server is shutting down"}
        except InputError as error:
            status = "failed"
            failure = {"type": "invalid_request_error", "code": None, "message": str(error)}
            await session.error(str(error))
        finally:  # a reply ended early (cancelled, failed, its session gone) stops decoding at once
            self.stop_model()  # the voice questions: done already when the reply was spoken; else unwanted
        if not opened:  # cancelled or failed before the reply was known
            await open_message()
        content = (
            {"type": "output_audio", "transcript": strip_tags(text)}
            if audio
            else {"type": "output_text", "text": strip_tags(text)}
        )
        item["content"] = [content]
        item["status"] = "completed" if status == "completed" else "incomplete"
        if audio:
            await send("response.output_audio.done", **ids)
            await send("response.output_audio_transcript.done", transcript=content["transcript"], **ids)
        else:
            await send("response.output_text.done", text=content["text"], **ids)
        await send(
            "response.content_part.done",
            part={"type": "audio", "transcript": content["transcript"]}
            if audio
            else {"type": "text", "text": content["text"]},
            **ids,
        )
        public = {k: v for k, v in item.items() if not k.startswith("_")}
        await send("response.output_item.done", response_id=self.id, output_index=0, item=public)
        await send("conversation.item.done", item=public, previous_item_id=previous)
        usage = _usage(completion) if completion is not None else None
        details: dict[str, Any] | None = {"type": status, "reason": reason} if reason else None
        if failure is not None:
            details = {"type": "failed", "error": failure}
        if session.turns is not None:  # the idle timeout counts from the end of the reply
            session.idle_from_ms = session.turns.heard_ms
        done = self._response(status, [public], usage, details)
        # voxtune's addition: the language and style it answered in, and the audio store's ids
        # of the user clips it read (for `input_audio: {"id": ...}` in later HTTP requests).
        extra: dict[str, Any] = {"input_audio": self.stored} if self.stored else {}
        if self.voice_choice is not None:
            extra |= {"language": self.voice_choice[0], "style": self.voice_choice[1]}
        if extra:
            done["voxtune"] = extra
        await send("response.done", response=done)

    def start_model(self, history: list[dict], clips: dict[str, Audio] | None = None, ahead: bool = False) -> None:
        """Start the model on the conversation `history` (as a task, `self.model`), `clips`
        the audio of its items not committed yet. Called before `run` to have the reply under
        way when the turn it answers is confirmed; `ahead`: also decode up to the first
        sentence and speak it, ready to send."""
        self.model = asyncio.create_task(self._start_model(history, clips, ahead))

    async def _start_model(self, history: list[dict], clips: dict[str, Audio] | None, ahead: bool) -> None:
        session = self.session
        self.function_tools = [
            {"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
            for t in self.tools or []
            if t.get("type") == "function"
        ]
        tools = self.function_tools
        messages, audio_items = session.chat_messages(self.instructions, history, clips)
        if not messages:
            raise InputError("the conversation is empty: add an item before asking for a response")
        try:
            conversation = parse_messages(messages)
        except APIError as error:  # an item the session took that the chat format refuses
            raise InputError(error.message) from None
        prepared = await asyncio.to_thread(
            session.runtime.prepare_chat,
            conversation,
            session.owner,
            tools=tools or None,
            tool_choice=self.tool_choice if tools else None,
        )
        # Each user clip is in the audio store now: HTTP chat can refer to it by this id.
        self.stored = [
            {"item_id": item_id, "id": clip.id, "expires_at": clip.expires_at}
            for item_id, clip in zip(audio_items, prepared.clips, strict=True)
        ]
        example = prepared.example
        assert example is not None  # prepare_chat tokenises the conversation
        room = session.runtime.reply_room(example)
        # `rate_limits.updated`: voxtune has no per-minute quotas; its limit on tokens is the
        # model's context, of which this conversation leaves `room` for replies.
        if room is not None:
            self.rate_limits = [
                {
                    "name": "tokens",
                    "limit": len(example.input_ids) + room,
                    "remaining": room,
                    "reset_seconds": 0,
                }
            ]
        room = room or session.max_tokens
        limit = session.max_tokens if self.limit in (None, "inf") else min(int(self.limit), session.max_tokens)
        params = SamplingParams(max_new_tokens=max(1, min(limit, room)))
        self.pending = Pending(session.runtime.engine, example, params, session.drain)
        # The questions that choose the spoken reply's language and style, decoded alongside.
        self.asks = [
            Pending(session.runtime.engine, q, SamplingParams(max_new_tokens=4), session.drain)
            for q in (session.runtime.voice_prompts(prepared) if "audio" in self.modalities else [])
        ]
        self.heard = None if self.asks else []
        if ahead and "audio" in self.modalities and not tools:
            await self._speak_ahead()

    async def _speak_ahead(self) -> None:
        """Decode up to the reply's first speakable piece and render it, as `run` will ask for
        it; the events read meanwhile wait in `backlog` for `run`."""
        assert self.pending is not None
        speech = SpokenText()
        while not self.running:  # once the turn is committed, `run` reads the events itself
            kind, value = await self.pending.next(poll=0.05)
            self.backlog.append((kind, value))
            if kind in ("done", "error"):
                return
            _, ready = speech.feed(value)
            if ready:
                self.ahead = (ready, await self._render(ready, speech.raw))
                return

    def stop_model(self) -> None:
        """Stop the model's work (a reply started early for a turn that went on)."""
        if self.model is not None:
            self.model.cancel()
            if self.model.done() and not self.model.cancelled():
                self.model.exception()  # seen: a failure of a reply nobody will send is no news
        cancel_all([self.pending] if self.pending is not None else [])
        cancel_all(self.asks)

    async def _speak(self, sentence: str, reply: str, item: dict, ids: dict) -> None:
        """One finished piece of the reply, spoken and sent as audio deltas, in the language and
        style the voice questions chose (asked once, before the first sentence)."""
        if self.ahead is not None and self.ahead[0] == sentence:
            audio, self.ahead = self.ahead[1], None
        else:
            audio = await self._render(sentence, reply)
        data = await asyncio.to_thread(formats.encode_wire, audio, self.output_format)
        step = PCM_PIECE_BYTES if self.output_format == "audio/pcm" else formats.G711_RATE // 2
        sent = 0
        for start in range(0, len(data), step):
            if self.session.response_cancelled:  # a barge-in or a cancel: no more audio
                break
            piece = data[start : start + step]
            await self.session.send("response.output_audio.delta", delta=base64.b64encode(piece).decode(), **ids)
            sent += len(piece)
        self.audio_ms += round(1000 * audio.duration * sent / len(data))
        if sent == len(data):  # a sentence cut by a barge-in was not heard whole: truncation leaves it out
            item.setdefault("_spoken", []).append((self.audio_ms, sentence))

    async def _render(self, sentence: str, reply: str) -> Audio:
        """`sentence` spoken in the language and style the voice questions chose (asked once)."""
        if self.heard is None:
            self.heard = [(await ask.result()).text for ask in self.asks]
        language, style = choose_voice(reply, *self.heard)
        self.voice_choice = (language, style)
        audio, _ = await asyncio.to_thread(render_reply, sentence, language, self.voice, style)
        return audio

    async def _calls(self, calls: list[dict], session: Session, previous: str | None) -> None:
        """A reply that calls tools: function_call items instead of the message."""
        send = session.send
        output = []
        for index, call in enumerate(calls):
            function = call["function"]
            call_item = {
                "id": new_id("item"),
                "type": "function_call",
                "object": "realtime.item",
                "status": "completed",
                "call_id": call["id"],
                "name": function["name"],
                "arguments": function["arguments"],
            }
            if not self.out_of_band:
                session.items.append(call_item)
            common = {"response_id": self.id, "item_id": call_item["id"], "output_index": index, "call_id": call["id"]}
            await send("response.output_item.added", response_id=self.id, output_index=index, item=call_item)
            await send("conversation.item.added", item=call_item, previous_item_id=previous)
            await send("response.function_call_arguments.delta", delta=function["arguments"], **common)
            await send(
                "response.function_call_arguments.done",
                arguments=function["arguments"],
                name=function["name"],
                **common,
            )
            await send("response.output_item.done", response_id=self.id, output_index=index, item=call_item)
            await send("conversation.item.done", item=call_item, previous_item_id=previous)
            output.append(call_item)
            previous = call_item["id"]
        await send("response.done", response=self._response("completed", output))


def _usage(completion: Any) -> dict:
    audio = completion.prompt_audio_tokens
    return {
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        "input_tokens": completion.prompt_tokens,
        "output_tokens": completion.completion_tokens,
        "input_token_details": {
            "text_tokens": completion.prompt_tokens - audio,
            "audio_tokens": audio,
            "image_tokens": 0,
            "cached_tokens": 0,
        },
        "output_token_details": {"text_tokens": completion.completion_tokens, "audio_tokens": 0},
    }
