"""Text generation for `SpeechLM`: batched, KV-cached, greedy or nucleus sampling, streamed.

Conversations in a batch are left-padded so every row's next token sits in the last column;
each row samples with its own generator, so a seeded request gives the same text alone or in
a batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import Cache

from voxtune.errors import InputError
from voxtune.model.processor import Example, MessageError, SpeechProcessor


class SamplingError(InputError):
    """Sampling parameters out of range."""


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; stop strings end the reply (not included)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] | str | None = None
    seed: int | None = None
    ignore_eos: bool = False  # run to max_new_tokens whatever comes (benchmarks, tests)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SamplingError(f"{name} must be a number, got {value!r}")
        for name in ("max_new_tokens", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SamplingError(f"{name} must be an integer, got {value!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise SamplingError(f"seed must fit in 64 bits, got {self.seed}")
        if self.max_new_tokens is None or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature < 1e-4:  # dividing logits by less overflows; it is greedy anyway
            self.temperature = 0.0
        if not 0 <= self.top_p <= 1:  # 0 keeps the most likely token only
            raise SamplingError(f"top_p must be in [0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]


class _Row:
    """One conversation's decoding state: its tokens, text, sampler and whether it is done."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # see _follow
        self.done = False
        self.reason: str | None = None  # why it is done: "stop" (end of turn, stop string) or "length"
        self.generator = None
        if params.seed is not None and params.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    @property
    def _stops(self) -> list[str]:
        return cast("list[str]", self.params.stop)  # SamplingParams.__post_init__ made it a list

    def pick(self, logits: torch.Tensor) -> int:
        """Sample the next token from `logits` [V] (temperature > 0; greedy is batched elsewhere)."""
        probs = torch.softmax(logits.float() / self.params.temperature, dim=-1)
        if self.params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p (the top token always stays).
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.params.top_p
            outside[0] = False  # a top_p that rounds to 0 in float32 would otherwise mask them all
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def add(self, token: int, stop_ids: set[int], tokenizer=None) -> None:
        """Take a token (and, given the `tokenizer`, follow the text); finish on a stop token, a
        stop string or the token limit."""
        if token in stop_ids and not self.params.ignore_eos:
            self.done, self.reason = True, "stop"
            self._flush(tokenizer)
            return
        self.tokens.append(token)
        if tokenizer is not None:
            self._follow(tokenizer)
        self._apply_stops()
        if len(self.tokens) >= self.params.max_new_tokens and not self.done:
            self.done, self.reason = True, "length"
            self._flush(tokenizer)

    def _apply_stops(self) -> None:
        """End the text at the first stop string in it, if any."""
        for stop in self._stops:
            if stop in self.text:
                self.text = self.text[: self.text.index(stop)]
                self.done, self.reason = True, "stop"

    def _follow(self, tokenizer, *, final: bool = False) -> None:
        """Extend `text` by the new tokens' text, decoding a short window instead of the whole
        reply: tokens[prefix:read] were decoded already and give the context that tokenizers
        need to space the new ones right. Held back while the tail is a partial UTF-8 character
        (unless `final`)."""
        before = tokenizer.decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        after = tokenizer.decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def _flush(self, tokenizer) -> None:
        """Take the text held back for a partial character, at the end of the reply."""
        if tokenizer is not None:
            self._follow(tokenizer, final=True)
            self._apply_stops()

    def settled_text(self) -> str:
        """The text that can no longer change: held back are a partial UTF-8 character and
        a tail that could still grow into a stop string."""
        if self.done:
            return self.text
        text = self.text.rstrip("\ufffd")
        hold = max((len(s) - 1 for s in self._stops), default=0)
        return text[: len(text) - hold] if hold else text


def stop_token_ids(model) -> set[int]:
    """End-of-sequence and end-of-turn ids of the model's tokenizer, family and generation config."""
    tokenizer = model.tokenizer
    ids = {tokenizer.eos_token_id}
    end_of_turn = model.family.end_of_turn
    if end_of_turn is not None:
        found = tokenizer.convert_tokens_to_ids(end_of_turn)
        # A token the vocabulary lacks comes back as unk; Whisper's unk is its end token.
        if found != tokenizer.unk_token_id or end_of_turn == tokenizer.unk_token:
            ids.add(found)
    configured = getattr(getattr(model.lm, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def context_length(model) -> int | None:
    """The most positions (prompt and reply) the model's LM reads; None: no set limit."""
    config = model.lm.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "max_target_positions", None)


def check_prompt(model, example: Example, max_new_tokens: int) -> None:
    """Raise `MessageError` when the prompt and the longest reply do not fit the LM's context."""
    limit = context_length(model)
    length = len(example.input_ids)
    if limit is not None and length + max_new_tokens > limit:
        raise MessageError(
            f"the prompt is {length} tokens and the reply may take {max_new_tokens}; this model reads at most {limit}"
        )


@dataclass
class Prefill:
    """The model's state after reading left-padded prompts."""

    logits: torch.Tensor  # [B, V]: each row's next-token logits
    cache: Cache  # keys and values [B, H, L, d] per layer (and cross-attention's, for encoder-decoders)
    attention_mask: torch.Tensor  # [B, L]: 0 over the left padding
    positions: torch.Tensor  # [B, 1]: the position of each row's next token


@torch.no_grad()
def prefill(model, examples: Sequence[Example]) -> Prefill:
    """Read the prompts of `examples` together (left-padded) and keep their KV cache."""
    batch = model.processor.collate(examples, pad_left=True)
    attention_mask = batch["attention_mask"].to(model.device)  # [B, L]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]: left padding shifts them
    out = model.lm(
        **model.prompt_inputs(batch),
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=model.new_cache(),
        use_cache=True,
        logits_to_keep=1,  # only the last position picks a token
    )
    return Prefill(out.logits[:, -1], out.past_key_values, attention_mask, positions[:, -1:] + 1)


@torch.no_grad()
def decode_step(model, tokens: Sequence[int], state: Prefill) -> torch.Tensor:
    """Feed one token per row to the model in `state` (advanced in place); returns the next
    logits [B, V]."""
    inputs = model.step_inputs(torch.tensor(list(tokens), device=model.device)[:, None])  # tokens [B, 1]
    mask = state.attention_mask
    state.attention_mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    out = model.lm(
        **inputs,
        attention_mask=state.attention_mask,
        position_ids=state.positions,
        past_key_values=state.cache,
        use_cache=True,
    )
    state.cache = out.past_key_values
    state.positions = state.positions + 1
    state.logits = out.logits[:, -1]
    return state.logits


def greedy_tokens(rows: Sequence[_Row], logits: torch.Tensor) -> list[int] | None:
    """Each row's most likely next token from `logits` [B, V], when any row decodes greedily:
    one argmax over the batch, not one call per row."""
    return logits.argmax(-1).tolist() if any(r.params.temperature == 0 for r in rows) else None


def pick_tokens(rows: Sequence[_Row], logits: torch.Tensor) -> list[int | None]:
    """The next token of each row from `logits` [B, V] (None for a row that is done)."""
    greedy = greedy_tokens(rows, logits)
    return [
        None if row.done else greedy[i] if greedy is not None and row.params.temperature == 0 else row.pick(logits[i])
        for i, row in enumerate(rows)
    ]


@torch.no_grad()
def _decode(
    model, conversations: Sequence[Sequence[dict]], params: SamplingParams, *, follow_text: bool
) -> Iterator[list[_Row]]:
    """Yield the rows after every decoding step until each is done. With `follow_text` each
    row's text is kept current (streaming and stop strings need it; it costs a decode a step)."""
    processor: SpeechProcessor = model.processor
    examples = [processor.encode_messages(c, add_generation_prompt=True) for c in conversations]
    for example in examples:
        check_prompt(model, example, params.max_new_tokens)
    device = model.device
    rows = [_Row(params, device) for _ in conversations]
    stop_ids = stop_token_ids(model)
    state = prefill(model, examples)
    pad_id = model.tokenizer.pad_token_id
    while True:
        next_tokens = []
        for row, token in zip(rows, pick_tokens(rows, state.logits), strict=True):
            if token is None:
                next_tokens.append(pad_id)
                continue
            row.add(token, stop_ids, model.tokenizer if follow_text else None)
            next_tokens.append(token)
        yield rows
        if all(row.done for row in rows):
            return
        decode_step(model, next_tokens, state)


def generate_batch(model, conversations: Sequence[Sequence[dict]], params: SamplingParams) -> list[str]:
    """Replies to several conversations, decoded together."""
    rows: list[_Row] = []
    for step_rows in _decode(model, conversations, params, follow_text=bool(params.stop)):
        rows = step_rows  # the last yield holds the finished rows
    if params.stop:
        return [row.text for row in rows]
    return [model.tokenizer.decode(row.tokens, skip_special_tokens=True) for row in rows]


def stream_one(model, messages: Sequence[dict], params: SamplingParams) -> Iterator[str]:
    """Reply to one conversation as text pieces, each sent as soon as it can no longer change.

    The prompt is encoded here, before the first piece, so bad input raises at the call.
    """
    steps = _decode(model, [messages], params, follow_text=True)
    first = next(steps)  # prefill now: errors surface before iteration

    def pieces() -> Iterator[str]:
        sent = ""
        for (row,) in itertools.chain([first], steps):
            settled = row.settled_text()
            if len(settled) > len(sent) and settled.startswith(sent):
                yield settled[len(sent) :]
                sent = settled

    return pieces()
