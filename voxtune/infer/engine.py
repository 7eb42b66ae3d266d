"""A generation engine that serves many conversations at once: continuous batching on one KV cache.

Requests that arrive while others decode join the running batch at the next step: their
prompts are read together (one prefill), then their cache rows are appended to the batch's.
A request that finishes, or is cancelled (its client went away), leaves the batch at once, so
a short request never waits for a long one. Rows are left-padded, so every row's next token
sits in the last column; positions are kept per row.

All model work happens on the engine's own thread; callers submit a conversation and receive
its text piece by piece through a callback (`Generation`), or use the blocking helpers.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache, EncoderDecoderCache
from transformers.cache_utils import CacheLayerMixin

from voxtune.model.generation import (
    Prefill,
    SamplingParams,
    _Row,
    check_prompt,
    decode_step,
    greedy_tokens,
    prefill,
    stop_token_ids,
)
from voxtune.model.processor import Example

if TYPE_CHECKING:
    from voxtune.model import SpeechLM

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """A finished reply: its text, why it ended ("stop", "length", "cancelled") and token counts."""

    text: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int
    prompt_audio_tokens: int


@dataclass
class Generation:
    """One submitted conversation. Events go to `sink` from the engine thread:
    `("piece", str)` for text that can no longer change, then `("done", Completion)` or
    `("error", Exception)`."""

    example: Example
    params: SamplingParams
    sink: Callable[[str, Any], None]
    row: _Row
    sent: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (the reply ends with finish_reason "cancelled")."""
        self.cancelled.set()

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt, audio positions included."""
        return len(self.example.input_ids)

    def audio_tokens(self, audio_token_id: int | None) -> int:
        """Prompt positions that hold audio."""
        return sum(1 for token in self.example.input_ids if token == audio_token_id)


class Engine:
    """Decodes every submitted conversation on one background thread, batched.

    Args:
        model: the speech LM (used read-only; do not train it while the engine runs).
        max_batch: most conversations decoded together; the rest wait their turn.
    """

    def __init__(self, model: SpeechLM, *, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self._queue: queue.Queue[Generation | None] = queue.Queue()
        self._active: list[Generation] = []
        self._state: Prefill | None = None
        self._stop_ids = stop_token_ids(model)
        self._closed = False
        self._closing = threading.Lock()
        self.steps = 0  # decode steps run (each advances every active row by one token)
        self.peak_batch = 0  # most rows ever decoded in one step
        self._thread = threading.Thread(target=self._run, name="voxtune-engine", daemon=True)
        self._thread.start()

    # ---- submitting -------------------------------------------------------------------------

    def submit(
        self, messages: Sequence[dict] | Example, params: SamplingParams, sink: Callable[[str, Any], None]
    ) -> Generation:
        """Queue a conversation (messages, or an `Example` already tokenised). Bad input raises
        here, in the caller's thread; everything after arrives through `sink`."""
        example = messages if isinstance(messages, Example) else self.encode(messages)
        check_prompt(self.model, example, params.max_new_tokens)
        generation = Generation(example, params, sink, _Row(params, self.model.device))
        with self._closing:  # nothing slips in behind close()'s sentinel
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the engine has stopped")
            self._queue.put(generation)
        return generation

    def encode(self, messages: Sequence[dict]) -> Example:
        """Tokenise a conversation for `submit` (audio is decoded here, encoded at prefill)."""
        return self.model.processor.encode_messages(messages, add_generation_prompt=True)

    def generate(self, messages: Sequence[dict], **sampling: Any) -> Completion:
        """Reply to one conversation, blocking until it is done."""
        for kind, value in self._events(messages, sampling):
            if kind == "done":
                return value
        raise AssertionError("unreachable: every generation ends with done or error")

    def stream(self, messages: Sequence[dict], **sampling: Any) -> Iterator[str]:
        """Reply to one conversation as text pieces; closing the iterator cancels it."""
        events = self._events(messages, sampling)
        next(events)  # submitted: bad input raises here, at the call

        def pieces() -> Iterator[str]:
            with closing(events):
                yield from (value for kind, value in events if kind == "piece")

        return pieces()

    def _events(self, messages: Sequence[dict], sampling: dict) -> Generator[tuple[str, Any], None, None]:
        """Submit, yield ("submitted", None), then the events up to "done"; raises on "error".
        Closing it early cancels the generation."""
        events: queue.Queue = queue.Queue()
        generation = self.submit(messages, SamplingParams(**sampling), lambda kind, value: events.put((kind, value)))
        try:
            yield "submitted", None
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            generation.cancel()

    def close(self) -> None:
        """Stop the engine thread; requests still running end as cancelled."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        """Conversations being decoded now."""
        return len(self._active)

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        stopping = False
        while not stopping:
            arrived, stopping = self._take()
            if arrived:
                self._admit_each(arrived)
            if self._active and not stopping:
                try:
                    self._step()
                except Exception as error:  # a bug or out of memory: fail these requests, keep serving
                    logger.exception("decoding failed")
                    self._fail(self._active, error)
                    self._active, self._state = [], None
        leftover = []
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        for generation in self._active + [g for g in leftover if g is not None]:
            if not generation.row.done:
                self._finish(generation, "cancelled")

    def _take(self) -> tuple[list[Generation], bool]:
        """New requests (waiting for one when idle, else whatever is queued, up to the batch)
        and whether the engine is closing."""
        arrived: list[Generation] = []
        while len(self._active) + len(arrived) < self.max_batch:
            try:
                item = self._queue.get(block=not self._active and not arrived)
            except queue.Empty:
                break
            if item is None:
                self._active += arrived  # the closing path cancels them
                return [], True
            if item.cancelled.is_set():
                self._finish(item, "cancelled")
            else:
                arrived.append(item)
        return arrived, False

    def _fail(self, generations: list[Generation], error: Exception) -> None:
        for generation in generations:
            if not generation.row.done:
                generation.row.done = True
                self._send(generation, "error", error)

    def _send(self, generation: Generation, kind: str, value: Any) -> None:
        """Deliver an event; a sink that raises cancels its own generation, nothing else."""
        try:
            generation.sink(kind, value)
        except Exception:  # noqa: BLE001 - the caller's callback; its failure must not stop the engine
            logger.exception("an event sink failed; cancelling its generation")
            generation.cancel()

    def _admit_each(self, arrived: list[Generation]) -> None:
        """Admit the new requests together; when that fails, one by one, so that a request
        that cannot be read fails alone and the others join the batch."""
        try:
            self._admit(arrived)
            return
        except Exception as error:  # noqa: BLE001 - whatever it is, it belongs to these requests only
            if len(arrived) == 1:
                logger.exception("prefill failed")
                self._fail(arrived, error)
                return
            joint_error = error
        for generation in arrived:
            if generation.row.done:  # it failed already, in the joint attempt's token picking
                continue
            if generation.row.tokens:  # it has its first token already: reading it again would repeat it
                self._fail([generation], joint_error)
                continue
            try:
                self._admit([generation])
            except Exception as error:  # noqa: BLE001 - this request's own failure
                logger.exception("prefill failed")
                self._fail([generation], error)

    def _admit(self, arrived: list[Generation]) -> None:
        """Prefill the new requests together, take their first tokens and join them to the batch."""
        state = prefill(self.model, [g.example for g in arrived])
        self._pick(arrived, state.logits)
        keep = [i for i, g in enumerate(arrived) if not g.row.done]
        if not keep:
            return
        joined = [arrived[i] for i in keep]
        if len(keep) < len(arrived):
            _select(state, keep)
        if self._state is None:
            self._active, self._state = joined, state
        else:
            self._state = _concat(self._state, state)
            self._active += joined

    def _step(self) -> None:
        """One token for every active row, then drop the rows that are done."""
        self.peak_batch = max(self.peak_batch, len(self._active))
        for generation in self._active:
            if generation.cancelled.is_set() and not generation.row.done:
                self._finish(generation, "cancelled")
        keep = [i for i, g in enumerate(self._active) if not g.row.done]
        if len(keep) < len(self._active):
            self._drop(keep)
            if not self._active:
                return
        assert self._state is not None  # there is a batch state while rows are active
        logits = decode_step(self.model, [g.row.tokens[-1] for g in self._active], self._state)
        self.steps += 1
        self._pick(self._active, logits)
        keep = [i for i, g in enumerate(self._active) if not g.row.done]
        if len(keep) < len(self._active):
            self._drop(keep)

    def _pick(self, generations: list[Generation], logits: torch.Tensor) -> None:
        """Choose each row's next token, send its settled text, finish the rows that end. A
        row whose sampling or text fails ends with that error; the other rows go on."""
        greedy = greedy_tokens([g.row for g in generations], logits)
        for i, generation in enumerate(generations):
            row = generation.row
            if row.done:
                continue
            try:
                token = greedy[i] if greedy is not None and row.params.temperature == 0 else row.pick(logits[i])
                row.add(token, self._stop_ids, self.model.tokenizer)
                settled = row.settled_text()
            except Exception as error:  # noqa: BLE001 - this request's own failure
                logger.exception("choosing a token failed")
                self._fail([generation], error)
                continue
            if len(settled) > len(generation.sent) and settled.startswith(generation.sent):
                self._send(generation, "piece", settled[len(generation.sent) :])
                generation.sent = settled
            if row.done:
                self._finish(generation, row.reason or "stop")

    def _drop(self, keep: list[int]) -> None:
        self._active = [self._active[i] for i in keep]
        if not self._active:
            self._state = None
            return
        assert self._state is not None  # there is a batch state while rows are active
        _select(self._state, keep)

    def _finish(self, generation: Generation, reason: str) -> None:
        row = generation.row
        row.done = True
        self._send(
            generation,
            "done",
            Completion(
                text=row.text if reason != "cancelled" else generation.sent,
                finish_reason=reason,
                completion_tokens=len(row.tokens),
                prompt_tokens=generation.prompt_tokens,
                prompt_audio_tokens=generation.audio_tokens(self.model.processor.audio_token_id),
            ),
        )


def _select(state: Prefill, rows: list[int]) -> None:
    """Keep only `rows` of a batch state, and drop the columns that are padding in all of them."""
    index = torch.tensor(rows, device=state.attention_mask.device)
    mask = state.attention_mask[index]  # [B', L]
    start = int(mask.any(0).nonzero()[0])  # left columns no remaining row reads
    state.attention_mask = mask[:, start:]
    state.positions = state.positions[index]
    state.logits = state.logits[index]
    state.cache = _map_cache(state.cache, lambda t: t[index, :, start:], lambda t: t[index])


def _concat(old: Prefill, new: Prefill) -> Prefill:
    """Two batch states as one: the shorter is left-padded to the longer's length."""
    length = max(old.attention_mask.shape[1], new.attention_mask.shape[1])

    def pad(tensor: torch.Tensor, axis_from_end: int) -> torch.Tensor:
        missing = length - tensor.shape[-axis_from_end]
        # F.pad takes (left, right) pairs from the last axis backwards.
        return F.pad(tensor, [0, 0] * (axis_from_end - 1) + [missing, 0]) if missing else tensor

    def join(first: Cache, second: Cache, padded: bool) -> DynamicCache:
        fit = (lambda t: pad(t, 2)) if padded else (lambda t: t)
        return DynamicCache(
            ddp_cache_data=[
                (torch.cat([fit(k1), fit(k2)]), torch.cat([fit(v1), fit(v2)]))  # [B, H, L, d]
                for (k1, v1), (k2, v2) in zip(_layers(first), _layers(second), strict=True)
            ]
        )

    if isinstance(old.cache, EncoderDecoderCache) and isinstance(new.cache, EncoderDecoderCache):
        # Cross-attention rows all read a whole encoder window: same length, nothing to pad.
        cache: Cache = EncoderDecoderCache(
            join(old.cache.self_attention_cache, new.cache.self_attention_cache, True),
            join(old.cache.cross_attention_cache, new.cache.cross_attention_cache, False),
        )
    else:
        cache = join(old.cache, new.cache, True)
    return Prefill(
        logits=torch.cat([old.logits, new.logits]),
        cache=cache,
        attention_mask=torch.cat([pad(old.attention_mask, 1), pad(new.attention_mask, 1)]),
        positions=torch.cat([old.positions, new.positions]),
    )


def _map_cache(cache: Cache, self_attention: Any, cross_attention: Any) -> Cache:
    """A new cache with `self_attention` applied to every self-attention key and value
    [B, H, L, d], and `cross_attention` to an encoder-decoder's cross-attention ones."""

    def mapped(part: Cache, fn: Any) -> DynamicCache:
        return DynamicCache(ddp_cache_data=[(fn(k), fn(v)) for k, v in _layers(part)])

    if isinstance(cache, EncoderDecoderCache):
        return EncoderDecoderCache(
            mapped(cache.self_attention_cache, self_attention), mapped(cache.cross_attention_cache, cross_attention)
        )
    return mapped(cache, self_attention)


def _layers(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [B, H, L, d] of every layer of a cache."""
    # The engine's caches are attention caches that prefill has filled: every layer holds both.
    layers = cast(list[CacheLayerMixin], cache.layers)
    return [(cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values)) for layer in layers]
