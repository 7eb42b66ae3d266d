"""`Runtime`: a loaded speech LM ready to serve many users; what the server is a thin layer over.

It owns the batching `Engine` and the `AudioStore`, turns OpenAI-shaped chat messages into the
model's conversation (decoding each clip once, encoding it once, and reusing stored clips by
id or by content), and transcribes long audio span by span, the spans decoded together.
"""

from __future__ import annotations

import base64
import binascii
import functools
import queue
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from voxtune.audio import Audio, AudioError, AudioTooLongError, load
from voxtune.audio.encode import PCM16_RATE
from voxtune.audio.features import MIN_SAMPLES, SAMPLE_RATE
from voxtune.audio.spans import speech_spans
from voxtune.errors import echo
from voxtune.infer.audio_store import AudioNotFoundError, AudioStore
from voxtune.infer.conversation import Clip, StoredClip, Text, Turn
from voxtune.infer.engine import Engine
from voxtune.infer.tools import render_tool_calls, tools_prompt
from voxtune.model import prompts
from voxtune.model.generation import SamplingParams, check_prompt, context_length
from voxtune.model.processor import AudioEmbedding, Example, MessageError
from voxtune.tags import LANGUAGES

if TYPE_CHECKING:
    from voxtune.model import SpeechLM

# Text longer than the context times this is refused before tokenising (which takes seconds and
# gigabytes for the megabytes a request body may hold): natural text averages about 4
# characters a token in the tokenizers here, and no word-like token comes near 32.
MAX_CHARS_PER_TOKEN = 32
# Formats an input_audio part may name (OpenAI allows wav and mp3; the rest are accepted too).
INPUT_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "webm", "m4a", "mp4", "aac", "pcm16", "pcm")


@dataclass
class InputClip:
    """A user clip of a request: its id in the store, its expiry and whether it was reused."""

    id: str
    expires_at: int
    seconds: float
    reused: bool


@dataclass
class _Fresh:
    """A clip of this request not seen before: decoded, to be encoded once the request is accepted."""

    audio: Audio
    digest: str


@dataclass
class PreparedChat:
    """A request's conversation as the model reads it (every clip already encoded)."""

    messages: list[dict]
    clips: list[InputClip] = field(default_factory=list)
    last_clip: AudioEmbedding | None = None  # the newest user clip: the voice of a spoken reply follows it
    example: Example | None = None  # `messages` tokenised, as the engine reads them


@dataclass
class Segment:
    """One span of a transcript with its times (seconds) and language."""

    id: int
    start: float
    end: float
    text: str
    language: str | None


@dataclass
class Transcript:
    """The words of a clip, span by span."""

    text: str
    language: str | None
    duration: float
    segments: list[Segment]


class Runtime:
    """A speech LM serving many requests: batching engine, audio store, message handling.

    Args:
        model: the loaded model (read-only from here on).
        max_batch: most conversations decoded together.
        store_bytes: memory budget of the audio store.
        audio_ttl: seconds an audio id stays valid.
        max_audio_seconds: most audio one request may carry (stored clips included).
    """

    def __init__(
        self,
        model: SpeechLM,
        *,
        max_batch: int = 32,
        store_bytes: int = 256 << 20,
        audio_ttl: float = 3600.0,
        max_audio_seconds: float = 600.0,
    ) -> None:
        self.model = model
        self.engine = Engine(model, max_batch=max_batch)
        self.store = AudioStore(max_bytes=store_bytes, ttl_seconds=audio_ttl)
        self.max_audio_seconds = max_audio_seconds

    def close(self) -> None:
        """Stop the engine."""
        self.engine.close()

    # ---- chat -------------------------------------------------------------------------------

    def prepare_chat(
        self,
        conversation: Sequence[Turn],
        owner: str,
        *,
        tools: Sequence[dict] | None = None,
        tool_choice: Any = None,
        reply_tokens: int = 1,
    ) -> PreparedChat:
        """The model's conversation for `conversation` sent by `owner` (an API key), tokenised
        (`example`) with every clip encoded.

        A user turn's clips come with the request (`Clip`) or are stored by an earlier one
        (`StoredClip`); an assistant turn may name an earlier spoken reply (its text is used)
        and carry tool calls. A last user turn of audio alone is a spoken request to answer.
        `tools` (with `tool_choice` other than "none") are offered in a system message. The
        turns' shapes are checked where they arrive (`voxtune.serve.messages` for the OpenAI
        wire format); what is checked here needs the model, the store or the audio.

        The cheap bounds come first: the text's length before tokenising, the audio's duration
        (the request limit, and what the context holds) while decoding, the prompt's tokens
        with `reply_tokens` to follow before any clip is encoded. Only an accepted request has
        its new clips encoded and stored.
        """
        if not conversation:
            raise MessageError("the conversation is empty")
        offer = tools_prompt(tools, tool_choice or "auto") if tools and tool_choice != "none" else None
        self._check_text_length(conversation, offer)
        prepared = PreparedChat([])
        slots: list[tuple[dict, Any]] = []  # (audio part, stored entry or _Fresh clip), in reading order
        for index, turn in enumerate(conversation):
            prepared.messages.append(self._message(turn, index, owner, slots))
        for part, item in slots:  # the decoded clips count their tokens as well as encoded ones
            part["audio"] = item.audio if isinstance(item, _Fresh) else item.embedding
        if self.model.knows_task_tags:
            prepared.messages = prompts.ask_spoken_requests(prepared.messages)
        if offer is not None:
            prepared.messages.insert(0, {"role": "system", "content": offer})
        check_prompt(self.model, self.engine.encode(prepared.messages), reply_tokens)
        fresh: dict[str, Any] = {}
        for part, item in slots:
            reused = not isinstance(item, _Fresh)
            if not reused:
                if item.digest not in fresh:  # the same clip twice in one request is encoded once
                    fresh[item.digest] = self.store.put_clip(owner, self.model.encode_audio(item.audio), item.digest)
                item = fresh[item.digest]
            part["audio"] = item.embedding
            prepared.clips.append(InputClip(item.id, item.expires_at, item.embedding.duration, reused))
            prepared.last_clip = item.embedding
        prepared.example = self.engine.encode(prepared.messages)
        return prepared

    def _check_text_length(self, conversation: Sequence[Turn], offer: str | None) -> None:
        """Refuse text that cannot fit the context whatever its tokens, before tokenising it."""
        limit = context_length(self.model)
        if limit is None:
            return
        chars = len(offer or "") + sum(len(turn.text) for turn in conversation)
        if chars > limit * MAX_CHARS_PER_TOKEN:
            raise MessageError(
                f"the messages hold {chars} characters of text; this model reads at most {limit} tokens "
                f"(about {limit * MAX_CHARS_PER_TOKEN} characters at the very most)"
            )

    @functools.cached_property
    def context_audio_seconds(self) -> float:
        """The longest audio the model's context holds (a clip's tokens, one position left for
        a reply); the request limit where that is shorter or the model has no set context."""
        limit = context_length(self.model)
        most = int(self.max_audio_seconds * SAMPLE_RATE)
        if limit is None or self.model.audio_tokens(most) < limit:
            return self.max_audio_seconds
        low, high = 0, most  # audio_tokens grows with the samples: the last length that fits
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.model.audio_tokens(middle) < limit else (low, middle - 1)
        return low / SAMPLE_RATE

    def _message(self, turn: Turn, index: int, owner: str, slots: list[tuple[dict, Any]]) -> dict:
        where = f"messages[{index}]"
        if turn.role != "user":
            text = self._assistant_text(turn, where, owner) if turn.role == "assistant" else turn.text
            return {"role": turn.role, "content": text}
        if len(turn.parts) == 1 and isinstance(turn.parts[0], Text):
            return {"role": "user", "content": turn.parts[0].text}
        parts: list[dict[str, Any]] = []
        for number, part in enumerate(turn.parts):
            if isinstance(part, Text):
                parts.append({"type": "text", "text": part.text})
            else:
                slot = {"type": "audio", "audio": None}  # filled in once the whole request is accepted
                slots.append((slot, self._clip(part, f"{where}.content[{number}]", owner, slots)))
                parts.append(slot)
        return {"role": "user", "content": parts}

    def _assistant_text(self, turn: Turn, where: str, owner: str) -> str:
        text = turn.text
        if turn.reply_id is not None:
            entry = self.store.get(turn.reply_id, owner)
            if entry.text is None:
                raise MessageError(f"{where}.audio.id {echo(turn.reply_id)} is a user clip, not a spoken reply")
            text = entry.text  # what the model said, tags and all
        if turn.tool_calls:
            text = "\n".join(t for t in (text, render_tool_calls(list(turn.tool_calls))) if t)
        return text

    def _clip(self, part: Clip | StoredClip, where: str, owner: str, slots: list[tuple[dict, Any]]) -> Any:
        """A clip's stored entry (by id or content), else the decoded clip (`_Fresh`); raises
        `AudioTooLongError` as soon as the request's audio passes the limit."""
        used = sum(
            item.embedding.duration if not isinstance(item, _Fresh) else item.audio.duration for _, item in slots
        )
        if isinstance(part, StoredClip):
            entry = self.store.get(part.id, owner)
            if entry.embedding is None:
                raise MessageError(f"{where}.input_audio.id {echo(part.id)} is a spoken reply, not a user clip")
            self._check_budget(used + entry.embedding.duration)
            return entry
        digest = self.store.digest(f"{part.format}:{part.data}")
        found = self.store.find_clip(owner, digest)
        if found is not None:
            assert found.embedding is not None  # found by its content hash: a user clip
            self._check_budget(used + found.embedding.duration)
            return found
        try:  # decoding stops as soon as the clip passes what is left of the budget
            audio = self.decode(
                part.data, part.format, where=f"{where}.input_audio", max_seconds=self.context_audio_seconds - used
            )
        except AudioTooLongError:
            raise self._over_budget() from None
        return _Fresh(audio, digest)

    def _check_budget(self, seconds: float) -> None:
        if seconds > self.context_audio_seconds:
            raise self._over_budget()

    def _over_budget(self) -> AudioTooLongError:
        if self.context_audio_seconds < self.max_audio_seconds:
            return AudioTooLongError(
                f"the request carries more than {self.context_audio_seconds:.0f} s of audio, what this model's "
                f"context holds"
            )
        return AudioTooLongError(f"the request carries more than {self.max_audio_seconds:g} s of audio, the limit")

    def decode(
        self,
        data: str | bytes,
        fmt: str | None = None,
        *,
        where: str = "audio",
        allow_silent: bool = False,
        max_seconds: float | None = None,
    ) -> Audio:
        """16 kHz audio from base64 text (or bytes), checked: decodable, within `max_seconds`
        (default: the request limit), long enough to hear, and (unless `allow_silent`) not
        silent. Text is never read as a file path."""
        if isinstance(data, str):
            if data.startswith("data:") and "," in data:  # a data URL: its payload
                data = data.split(",", 1)[1]
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise MessageError(f"{where}.data is not valid base64") from None
        try:
            audio = load(
                data,
                SAMPLE_RATE,
                format=fmt,
                rate=PCM16_RATE if fmt in ("pcm16", "pcm") else None,
                max_duration=self.max_audio_seconds if max_seconds is None else max(max_seconds, 0.0),
            )
        except AudioError as error:
            raise type(error)(f"{where}: {error}") from None
        if len(audio) < MIN_SAMPLES:
            raise MessageError(f"{where}: the clip is {audio.duration * 1000:.0f} ms, too short to hear")
        if not allow_silent and not speech_spans(audio):
            raise MessageError(f"{where}: the clip is silent")
        return audio

    def reply_room(self, example: Example) -> int | None:
        """Tokens left for a reply after the prompt `example` (None: the LM has no set context)."""
        limit = context_length(self.model)
        return None if limit is None else limit - len(example.input_ids)

    def voice_prompts(self, prepared: PreparedChat) -> list[list[dict]]:
        """The two questions whose answers choose a spoken reply's voice (which language the
        user spoke, how they sounded), about the newest user clip; none without a clip or
        for a model not taught to answer them."""
        if prepared.last_clip is None or not self.model.knows_task_tags:
            return []
        return [prompts.language_messages(prepared.last_clip), prompts.describe_messages(prepared.last_clip)]

    def remember_reply(self, owner: str, text: str, audio_id: str | None = None) -> Any:
        """Store a spoken reply's text under `audio_id` (or a new id); returns the entry."""
        return self.store.put_reply(owner, text, audio_id)

    # ---- transcription ----------------------------------------------------------------------

    def plan_transcription(
        self, audio: Audio, language: str | None = None, *, temperature: float = 0.0
    ) -> TranscriptionPlan:
        """The spans of speech in `audio` and the conversation that asks for each one's words."""
        if language is not None and language not in LANGUAGES:
            raise MessageError(
                f"language must be an ISO-639-1 code this model knows ({', '.join(LANGUAGES)}), not {echo(language)}"
            )
        window = self.model.processor.max_seconds  # a span must fit the encoder (and its 0.1 s pads)
        longest_span = 20.0 if window is None else min(20.0, window - 0.25)
        spans = [(s, e) for s, e in speech_spans(audio, max_span=longest_span) if (e - s) * SAMPLE_RATE >= MIN_SAMPLES]
        clips = [Audio(audio.samples[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)], SAMPLE_RATE) for s, e in spans]
        # About 40 tokens per second of speech is more than any language here needs.
        longest = max((e - s for s, e in spans), default=0.0)
        params = SamplingParams(max_new_tokens=min(448, 32 + int(40 * longest)), temperature=temperature)
        conversations = [self.model.transcription_messages(c, language) for c in clips]
        return TranscriptionPlan(spans, conversations, params, audio.duration, language, self.model.read_transcript)

    def transcribe(self, audio: Audio, language: str | None = None, *, temperature: float = 0.0) -> Transcript:
        """The words of `audio`, one segment per stretch of speech, the spans decoded together."""
        plan = self.plan_transcription(audio, language, temperature=temperature)
        events: queue.Queue = queue.Queue()
        generations = []
        replies: dict[int, str] = {}
        try:
            for i, conversation in enumerate(plan.conversations):
                sink = lambda kind, value, i=i: events.put((i, kind, value))  # noqa: E731
                generations.append(self.engine.submit(conversation, plan.params, sink))
            while len(replies) < len(plan.conversations):
                i, kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    replies[i] = value.text
        finally:  # a failed span stops the others
            for generation in generations:
                generation.cancel()
        return plan.transcript([replies[i] for i in range(len(replies))])


@dataclass
class TranscriptionPlan:
    """What transcribing a clip takes: its spans of speech and one conversation per span."""

    spans: list[tuple[float, float]]
    conversations: list[list[dict]]
    params: SamplingParams
    duration: float
    language: str | None
    read: Callable[[str], tuple[str, str | None]]  # a reply -> (its words, the language it names)

    def transcript(self, replies: Sequence[str]) -> Transcript:
        """The transcript from the model's reply for each span (in order)."""
        segments = []
        for i, ((start, end), raw) in enumerate(zip(self.spans, replies, strict=True)):
            text, found = self.read(raw)
            segments.append(Segment(i, round(start, 3), round(end, 3), text, found or self.language))
        heard = Counter(s.language for s in segments if s.language)
        return Transcript(
            text=" ".join(s.text for s in segments if s.text),
            language=self.language or (heard.most_common(1)[0][0] if heard else None),
            duration=self.duration,
            segments=segments,
        )


__all__ = ["AudioNotFoundError", "InputClip", "PreparedChat", "Runtime", "Segment", "Transcript", "TranscriptionPlan"]
