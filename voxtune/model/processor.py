"""OpenAI-style messages -> token ids, labels and audio, ready for `SpeechLM`.

Each audio clip becomes one `<|audio|>` token in the rendered chat, then that token is expanded
to exactly as many positions as the model emits for the clip, where its audio embeddings are
spliced in. Labels keep only the assistant turns (their text and their end-of-turn token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from voxtune.audio import Audio, AudioError, AudioTooLongError, load
from voxtune.audio.features import MIN_SAMPLES, log_mel_batch
from voxtune.errors import InputError
from voxtune.model.tokens import AUDIO_TOKEN

IGNORE_INDEX = -100  # label value the loss skips
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class AudioEmbedding:
    """A clip already encoded by a model: `embeddings` [n_tokens, D_lm], reusable in later prompts
    without encoding the audio again."""

    embeddings: torch.Tensor
    duration: float

    @property
    def num_tokens(self) -> int:
        """How many LM positions the clip takes."""
        return self.embeddings.shape[0]


Clip = Audio | AudioEmbedding


@dataclass
class Example:
    """One tokenised conversation: ids, labels (None when not asked for) and its clips in order."""

    input_ids: list[int]
    labels: list[int] | None
    clips: list[Clip] = field(default_factory=list)


class MessageError(InputError):
    """A conversation that cannot be turned into a prompt."""


class SpeechProcessor:
    """Turns messages into `Example`s and batches of them into model inputs.

    Args:
        tokenizer: a fast Hugging Face tokenizer with a chat template and `AUDIO_TOKEN`.
        audio_tokens: number of LM positions for a clip of n samples at 16 kHz.
        n_mels: mel bins of the features the encoder reads.
        max_seconds: longest clip the encoder takes (None: any).
    """

    def __init__(
        self, tokenizer: Any, audio_tokens: Callable[[int], int], n_mels: int, max_seconds: float | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.audio_tokens = audio_tokens
        self.n_mels = n_mels
        self.max_seconds = max_seconds
        self.audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        if self.audio_token_id is None or self.audio_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {AUDIO_TOKEN} token")

    # ---- messages -> example ----------------------------------------------------------------

    def encode_messages(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = False, with_labels: bool = False
    ) -> Example:
        """Tokenise a conversation; audio parts become placeholders expanded per clip.

        Content may be a string or a list of parts: `{"type": "text", "text": ...}`,
        `{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}` (OpenAI),
        or `{"type": "audio", "audio": <Audio | AudioEmbedding | path | bytes>}`.
        """
        if not messages:
            raise MessageError("a conversation needs at least one message")
        rendered, clips = [], []
        for index, message in enumerate(messages):
            rendered.append(self._flatten(message, index, clips))
        text = self._render(rendered, add_generation_prompt)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=with_labels)
        ids = list(encoding["input_ids"])
        labels = self._labels(rendered, text, encoding["offset_mapping"], ids) if with_labels else None
        return self._expand(ids, labels, clips)

    def _flatten(self, message: dict, index: int, clips: list[Clip]) -> dict:
        """A message with string content: audio parts replaced by the placeholder token."""
        if not isinstance(message, dict) or "role" not in message:
            raise MessageError(f"message {index} must be an object with a 'role'")
        role, content = message["role"], message.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise MessageError(f"message {index} has unknown role {role!r}")
        role = "system" if role == "developer" else role
        if isinstance(content, str):
            return {"role": role, "content": self._check_text(content, index)}
        if not isinstance(content, list):
            raise MessageError(f"message {index} content must be a string or a list of parts")
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(self._check_text(part.get("text", ""), index))
            elif kind in ("input_audio", "audio"):
                if role == "assistant":
                    raise MessageError(f"message {index}: assistant turns hold text only")
                clip = _clip(part, kind, index)
                if self.max_seconds is not None and isinstance(clip, Audio) and clip.duration > self.max_seconds:
                    raise AudioTooLongError(
                        f"message {index}: audio clip is {clip.duration:.1f} s; this model's encoder "
                        f"takes at most {self.max_seconds:g} s per clip"
                    )
                clips.append(clip)
                pieces.append(AUDIO_TOKEN)
            else:
                raise MessageError(f"message {index} has a content part of unknown type {kind!r}")
        return {"role": role, "content": "".join(pieces)}

    @staticmethod
    def _check_text(text: str, index: int) -> str:
        if not isinstance(text, str):
            raise MessageError(f"message {index} has text that is not a string")
        if AUDIO_TOKEN in text:  # it would be read as a clip that is not there
            raise MessageError(f"message {index}: text may not contain {AUDIO_TOKEN}")
        return text

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _labels(self, messages: list[dict], text: str, offsets: list[tuple[int, int]], ids: list[int]) -> list[int]:
        """Mask all but the assistant turns. Each turn's characters are found by rendering the
        conversation up to it with and without that turn (templates are prefix-consistent)."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise MessageError("the chat template does not render conversations prefix-consistently")
            spans.append((len(before), len(through)))
        labels = [IGNORE_INDEX] * len(ids)
        for position, (token_start, token_end) in enumerate(offsets):
            if any(start <= token_start and token_end <= end for start, end in spans) and token_end > token_start:
                labels[position] = ids[position]
        return labels

    def _expand(self, ids: list[int], labels: list[int] | None, clips: list[Clip]) -> Example:
        """Repeat each audio placeholder as many times as its clip has audio tokens."""
        places = [i for i, token in enumerate(ids) if token == self.audio_token_id]
        if len(places) != len(clips):
            raise MessageError(f"{len(clips)} audio clips but {len(places)} placeholders after templating")
        out_ids: list[int] = []
        out_labels: list[int] | None = [] if labels is not None else None
        previous = 0
        for place, clip in zip(places, clips):
            count = clip.num_tokens if isinstance(clip, AudioEmbedding) else self.audio_tokens(len(clip))
            out_ids += ids[previous:place] + [self.audio_token_id] * count
            if out_labels is not None:
                out_labels += labels[previous:place] + [IGNORE_INDEX] * count
            previous = place + 1
        out_ids += ids[previous:]
        if out_labels is not None:
            out_labels += labels[previous:]
        return Example(out_ids, out_labels, clips)

    # ---- examples -> batch ------------------------------------------------------------------

    def collate(self, examples: Sequence[Example], *, pad_left: bool = False) -> dict[str, Any]:
        """Pad examples into a batch.

        Returns a dict with `input_ids` and `attention_mask` [B, L], `labels` [B, L] when every
        example has labels, and the clips in reading order (row by row): `audio_features`
        [N, M, T] and `audio_frames` [N] for raw audio, `audio_embeddings` (a list) for
        pre-encoded clips, and `audio_is_embedding` [N + E] saying which list each clip is in.
        `pad_left` pads on the left, as batched generation needs.
        """
        pad_id = self.tokenizer.pad_token_id
        length = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        with_labels = all(e.labels is not None for e in examples)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            cols = slice(length - n, length) if pad_left else slice(0, n)
            input_ids[row, cols] = torch.tensor(example.input_ids)
            attention_mask[row, cols] = 1
            if labels is not None:
                labels[row, cols] = torch.tensor(example.labels)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            batch["labels"] = labels
        clips = [clip for example in examples for clip in example.clips]
        audio = [clip for clip in clips if isinstance(clip, Audio)]
        batch["audio_is_embedding"] = torch.tensor([isinstance(c, AudioEmbedding) for c in clips], dtype=torch.bool)
        batch["audio_embeddings"] = [clip.embeddings for clip in clips if isinstance(clip, AudioEmbedding)]
        if audio:
            features, frames = log_mel_batch([clip.samples for clip in audio], self.n_mels)
            batch["audio_features"], batch["audio_frames"] = features, frames
        return batch


    def pack(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Concatenate examples into one row, padding-free: position ids restart at each example
        and a block-diagonal causal mask keeps examples from attending to each other.

        Returns the keys of `collate` with a batch of one, plus `position_ids` [1, L] and a
        boolean `attention_mask` [1, 1, L, L] (True = may attend). The mask is explicit because
        position ids alone do not separate sequences in every attention implementation.
        """
        joined = Example([], [] if all(e.labels is not None for e in examples) else None, [])
        positions, starts = [], []
        for example in examples:
            starts.append(len(joined.input_ids))
            joined.input_ids += example.input_ids
            if joined.labels is not None:
                # An example's first token is never predicted from the one before it.
                joined.labels += [IGNORE_INDEX] + example.labels[1:]
            joined.clips += example.clips
            positions += range(len(example.input_ids))
        batch = self.collate([joined])
        length = len(joined.input_ids)
        segment = torch.zeros(length, dtype=torch.long)
        for start in starts[1:]:
            segment[start:] += 1
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        batch["attention_mask"] = (causal & (segment[:, None] == segment[None, :]))[None, None]  # [1, 1, L, L]
        batch["position_ids"] = torch.tensor(positions)[None]  # [1, L]
        return batch


def _clip(part: dict, kind: str, index: int) -> Clip:
    """The clip a content part carries, as 16 kHz `Audio` or a pre-encoded `AudioEmbedding`."""
    try:
        if kind == "input_audio":
            payload = part.get("input_audio") or {}
            if "data" not in payload:
                raise MessageError(f"message {index}: input_audio needs 'data' (base64 audio)")
            audio = load(payload["data"], SAMPLE_RATE, format=payload.get("format"))
        else:
            value = part.get("audio")
            if isinstance(value, AudioEmbedding):
                return value
            if value is None:
                raise MessageError(f"message {index}: an audio part needs 'audio'")
            audio = load(value, SAMPLE_RATE)
    except AudioError as error:
        raise type(error)(f"message {index}: {error}") from None
    if len(audio) < MIN_SAMPLES:
        raise AudioError(f"message {index}: audio clip is {audio.duration * 1000:.0f} ms, too short to hear")
    return audio
