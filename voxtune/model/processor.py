"""OpenAI-style messages -> token ids, labels and audio, ready for `SpeechLM`.

Each audio clip becomes one `<|audio|>` token in the rendered chat, then that token is expanded
to exactly as many positions as the model emits for the clip, where its audio embeddings are
spliced in. Labels keep only the assistant turns (their text and their end-of-turn token).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jinja2 import TemplateError

from voxtune.audio import Audio, AudioError, AudioTooLongError, load
from voxtune.audio.features import MIN_SAMPLES, SAMPLE_RATE
from voxtune.audio.file_audio import FileAudio
from voxtune.errors import InputError, echo
from voxtune.tags import AUDIO_TOKEN

IGNORE_INDEX = -100  # label value the loss skips


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
    info: dict[str, Any] = field(default_factory=dict)  # where it came from (task, augmentation)


class MessageError(InputError):
    """A conversation that cannot be turned into a prompt."""


class SpeechProcessor:
    """Turns messages into `Example`s and batches of them into model inputs.

    Args:
        tokenizer: a fast Hugging Face tokenizer with a chat template and the audio token.
        audio_tokens: number of LM positions for a clip of n samples at 16 kHz.
        featurize: 16 kHz clips -> the encoder's input features [N, M, T] and valid frames [N].
        max_seconds: longest clip the encoder takes (None: any).
        end_of_turn: the token that closes an assistant turn (default: the tokenizer's eos).
        audio_token: the placeholder repeated once per audio position (None: the model reads
            audio some other way, e.g. an encoder-decoder's cross-attention, and a subclass
            lays out its prompts).
        audio_text: what a clip is written as in the chat before expansion: `audio_token`,
            with the markers some models put around it (e.g. `<|audio_bos|>...<|audio_eos|>`).
    """

    def __init__(
        self,
        tokenizer: Any,
        audio_tokens: Callable[[int], int],
        featurize: Callable[[list[np.ndarray]], tuple[torch.Tensor, torch.Tensor]],
        *,
        max_seconds: float | None = None,
        end_of_turn: str | None = None,
        audio_token: str | None = AUDIO_TOKEN,
        audio_text: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.audio_tokens = audio_tokens
        self.featurize = featurize
        self.max_seconds = max_seconds
        self.end_of_turn = end_of_turn or tokenizer.eos_token
        self.audio_token = audio_token
        self.audio_text = audio_text or audio_token or ""
        self.audio_token_id: int | None = None
        if audio_token is None:
            return
        if audio_token not in self.audio_text:
            raise ValueError(f"audio_text {self.audio_text!r} must hold the audio token {audio_token!r}")
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_token)
        if self.audio_token_id is None or self.audio_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {audio_token} token")

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
        rendered: list[dict] = []
        clips: list[Clip] = []
        for index, message in enumerate(messages):
            rendered.append(self._flatten(message, index, clips))
        ids: list[int] = []
        labels: list[int] | None = [] if with_labels else None
        for text, trained in self._pieces(rendered, add_generation_prompt, with_labels):
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            if labels is not None:
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return self._expand(ids, labels, clips)

    def _flatten(self, message: dict, index: int, clips: list[Clip]) -> dict:
        """A message with string content: audio parts replaced by the placeholder token."""
        if not isinstance(message, dict) or "role" not in message:
            raise MessageError(f"message {index} must be an object with a 'role'")
        role, content = message["role"], message.get("content")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise MessageError(f"message {index} has unknown role {echo(role)}")
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
                if role != "user":  # templates may move other turns, and their clips with them
                    raise MessageError(f"message {index}: only user turns may hold audio")
                clip = _clip(part, kind, index)
                if self.max_seconds is not None and isinstance(clip, Audio) and clip.duration > self.max_seconds:
                    raise AudioTooLongError(
                        f"message {index}: audio clip is {clip.duration:.1f} s; this model's encoder "
                        f"takes at most {self.max_seconds:g} s per clip"
                    )
                clips.append(clip)
                pieces.append(self.audio_text)
            else:
                raise MessageError(f"message {index} has a content part of unknown type {echo(kind)}")
        return {"role": role, "content": "".join(pieces)}

    def _check_text(self, text: str, index: int) -> str:
        if not isinstance(text, str):
            raise MessageError(f"message {index} has text that is not a string")
        if self.audio_token and self.audio_token in text:  # it would be read as a clip that is not there
            raise MessageError(f"message {index}: text may not contain {self.audio_token}")
        return text

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as error:  # e.g. a template that has no system role
            raise MessageError(f"the model's chat template refuses this conversation: {error}") from None

    def _pieces(self, messages: list[dict], add_generation_prompt: bool, with_labels: bool) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) pieces: each assistant reply up to and
        including its end-of-turn token is trained, the rest is not. A template that writes
        none after a reply (the next turn's opening closes it) gets it trained all the same.

        Pieces are tokenised one by one, so a reply's tokens are the ones the model produces
        after the prompt at inference (no token straddles the prompt and the reply). The
        turns are found by rendering the conversation up to each reply with and without it,
        which needs a prefix-consistent template."""
        text = self._render(messages, add_generation_prompt)
        if not with_labels:
            return [(text, False)]
        pieces, cursor = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            last = i + 1 == len(messages) and not add_generation_prompt
            through = text if last else self._render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through) and len(before) >= cursor):
                raise MessageError("the chat template does not render conversations prefix-consistently")
            end = len(through)
            marker = through.rfind(self.end_of_turn, len(before))
            closing = ""
            if marker >= 0:  # what a template writes after the end-of-turn token is not trained
                end = marker + len(self.end_of_turn)
            elif text.startswith(self.end_of_turn, end):  # the next turn's opening ends it (GLM-4)
                end += len(self.end_of_turn)
            elif end == len(text):  # the last reply, in a template that closes it with the next turn
                closing = self.end_of_turn  # trained all the same: the model learns to stop
            pieces += [(text[cursor : len(before)], False), (text[len(before) : end] + closing, True)]
            cursor = end
        pieces.append((text[cursor:], False))
        return [(piece, trained) for piece, trained in pieces if piece]

    def _expand(self, ids: list[int], labels: list[int] | None, clips: list[Clip]) -> Example:
        """Repeat each audio placeholder as many times as its clip has audio tokens."""
        places = [i for i, token in enumerate(ids) if token == self.audio_token_id]
        if len(places) != len(clips):
            raise MessageError(f"{len(clips)} audio clips but {len(places)} placeholders after templating")
        out_ids: list[int] = []
        out_labels: list[int] | None = [] if labels is not None else None
        previous = 0
        for place, clip in zip(places, clips, strict=True):
            count = clip.num_tokens if isinstance(clip, AudioEmbedding) else self.audio_tokens(len(clip))
            out_ids += ids[previous:place] + [ids[place]] * count  # the placeholder, the audio token
            if out_labels is not None and labels is not None:
                out_labels += labels[previous:place] + [IGNORE_INDEX] * count
            previous = place + 1
        out_ids += ids[previous:]
        if out_labels is not None and labels is not None:
            out_labels += labels[previous:]
        return Example(out_ids, out_labels, clips)

    # ---- examples -> batch ------------------------------------------------------------------

    def collate(self, examples: Sequence[Example], *, pad_left: bool = False, features: bool = True) -> dict[str, Any]:
        """Pad examples into a batch.

        Returns a dict with `input_ids` and `attention_mask` [B, L], `labels` [B, L] when every
        example has labels, and the clips in reading order (row by row): `audio_features`
        [N, M, T] and `audio_frames` [N] for raw audio, `audio_embeddings` (a list) for
        pre-encoded clips, and `audio_is_embedding` [N + E] saying which list each clip is in.
        `pad_left` pads on the left, as batched generation needs. `features=False` leaves the
        log-mel out (for a trainer that takes the clips' encoder outputs from a cache).
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
        if audio and features:
            batch["audio_features"], batch["audio_frames"] = self.featurize([clip.samples for clip in audio])
        return batch

    def pack(self, examples: Sequence[Example], *, features: bool = True) -> dict[str, Any]:
        """Concatenate examples into one row, padding-free: position ids restart at each example.

        Returns the keys of `collate` with a batch of one (`attention_mask` [1, L] all ones),
        plus `position_ids` [1, L] and `sequence_lengths` [n], the examples' lengths: what keeps
        the examples apart. No [L, L] mask is made here (a 16k-token row's took 374 ms and
        256 MiB of host memory): attention that runs per example reads the lengths (see
        `voxtune.model.packed_attention`), and `SpeechLM.lm_inputs` builds the block-diagonal
        causal mask on the model's device for the implementations that need one.
        """
        joined = Example([], [] if all(e.labels is not None for e in examples) else None, [])
        positions: list[int] = []
        for example in examples:
            joined.input_ids += example.input_ids
            if joined.labels is not None and example.labels is not None:  # all have labels, or none is kept
                # An example's first token is never predicted from the one before it.
                joined.labels += [IGNORE_INDEX] + example.labels[1:]
            joined.clips += example.clips
            positions += range(len(example.input_ids))
        batch = self.collate([joined], features=features)
        batch["position_ids"] = torch.tensor(positions)[None]  # [1, L]
        batch["sequence_lengths"] = torch.tensor([len(e.input_ids) for e in examples])
        return batch


def _clip(part: dict, kind: str, index: int) -> Clip:
    """The clip a content part carries, as 16 kHz `Audio` or a pre-encoded `AudioEmbedding`."""
    try:
        if kind == "input_audio":
            payload = part.get("input_audio")
            if not isinstance(payload, dict) or "data" not in payload:
                raise MessageError(f"message {index}: input_audio needs 'data' (base64 audio)")
            if not isinstance(payload["data"], str):
                raise MessageError(f"message {index}: input_audio data must be a base64 string")
            audio = load(payload["data"], SAMPLE_RATE, format=payload.get("format"))
        else:
            value = part.get("audio")
            if isinstance(value, AudioEmbedding):
                if value.embeddings.ndim != 2:
                    raise MessageError(f"message {index}: an AudioEmbedding must be [tokens, width]")
                return value
            if value is None:
                raise MessageError(f"message {index}: an audio part needs 'audio'")
            audio = as_audio(value)
    except AudioError as error:
        raise type(error)(f"message {index}: {error}") from None
    return audio


def as_audio(value: Any) -> Audio:
    """16 kHz `Audio` from anything `voxtune.audio.load` reads, long enough to hear."""
    if not isinstance(value, (str, bytes, bytearray, os.PathLike, Audio)) and not hasattr(value, "__array__"):
        raise MessageError(f"audio must be a path, bytes, base64, an array or Audio, not {type(value).__name__}")
    # A FileAudio came from `load` already, and need not be decoded again to be measured.
    audio = value if isinstance(value, FileAudio) and value.sample_rate == SAMPLE_RATE else load(value, SAMPLE_RATE)
    if len(audio) < MIN_SAMPLES:
        raise AudioError(f"audio clip is {audio.duration * 1000:.0f} ms, too short to hear")
    return audio
