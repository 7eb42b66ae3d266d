"""Voxtral (`model_type: voxtral`): a Whisper-large-v3 encoder read in 30 s chunks, a projector
that stacks 4 encoder frames, and a Llama-layout Mistral LM, with Mistral's tekken tokenizer
(mistral-common: `pip install 'voxtune[voxtral]'`).

- Audio: a clip is padded with silence to whole chunks (tekken.json's `audio.chunk_length_s`,
  30 s), featurised as one (Whisper log-mel, 128 bins), and cut into chunks of 3000 frames that
  the encoder reads one by one, with no attention mask (the padding is heard as silence), as
  `VoxtralProcessor` and the model do. A chunk gives 1500 encoder frames, stacked 4 by 4 into
  375 tokens: 375 per started 30 s (12.5 per second), one row of tokens per clip here.
- Longest clip: 40 minutes (80 chunks, 30,000 tokens: the longest audio Voxtral is documented to
  understand, within its 32k context), or less when the LM's positions hold fewer chunks.
- Prompts: mistral-common writes Voxtral's chats in token ids (tokenizer v7), never through a
  chat template, and never reads a control token from text. `VoxtralPrompts` lays them out the
  same way: `<s>`, then `[INST]` user `[/INST]`, the reply and `</s>` per turn, system turns as
  `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]`; a clip is `[BEGIN_AUDIO]` + `[AUDIO]` x n in the user's
  turn; text parts are joined as mistral-common joins them. A reply and its `</s>` (the stop
  token) are trained. There is no generation prompt: the reply follows `[/INST]`.
- Transcription: a chat of one clip asked for with voxtune's transcribe tag alone (and a
  language tag), which `transcribe` and the transcribe task's training data write, becomes
  Voxtral's own transcription request, `[INST][BEGIN_AUDIO][AUDIO]...[/INST]lang:xx[TRANSCRIBE]`
  (mistral-common's `encode_transcription`), then the bare transcript and `</s>`.
- The tokenizer voxtune calls is `TekkenText`, over the checkpoint's `MistralCommonBackend`,
  which has no chat template, cannot add tokens, and strips a leading `lang:xx` from what it
  decodes; the processor's own backend stays as it is (it saves tekken.json).

Shape letters: N clips, C chunks, M mel bins, T frames of a chunk, D width.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from voxtune.audio.features import SAMPLE_RATE
from voxtune.model.architectures.pretrained import (
    FeatureExtractorFrontEnd,
    PretrainedSpeechLM,
    causal_lm_view,
    load_processor,
    load_weights,
)
from voxtune.model.processor import IGNORE_INDEX, Clip, Example, MessageError, SpeechProcessor
from voxtune.model.registry import FAMILIES, Family
from voxtune.tags import strip_tags, tag, tag_values

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

AUDIO_TOKEN, BEGIN_AUDIO = "[AUDIO]", "[BEGIN_AUDIO]"
MAX_AUDIO_SECONDS = 40 * 60  # the longest audio Voxtral is documented to understand (32k context)
INSTALL = "pip install 'voxtune[voxtral]'"


def mistral_common_available() -> bool:
    """Whether transformers can build Voxtral's tokenizer (mistral-common, recent enough, with pillow)."""
    from transformers.utils import is_mistral_common_available

    return is_mistral_common_available()


# ---- the tokenizer voxtune calls ------------------------------------------------------------


class TekkenText:
    """Voxtral's tekken tokenizer as voxtune calls a tokenizer: text to ids (control tokens are
    never read from text), ids to text (a partial UTF-8 character decodes to U+FFFD), special
    tokens by name, and the ids of `</s>` (end and stop), `<pad>` and `<unk>`.

    Args:
        backend: the checkpoint's `MistralCommonBackend` (transformers), shared, not copied.
    """

    chat_template = None  # chats are laid out in ids (VoxtralPrompts)

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.tekken = backend.tokenizer.instruct_tokenizer.tokenizer  # mistral-common's Tekkenizer
        self.bos_token_id, self.eos_token_id = self.tekken.bos_id, self.tekken.eos_id
        self.pad_token_id, self.unk_token_id = self.tekken.pad_id, self.tekken.unk_id
        piece = self.tekken.id_to_piece
        self.bos_token, self.eos_token = piece(self.bos_token_id), piece(self.eos_token_id)
        self.pad_token, self.unk_token = piece(self.pad_token_id), piece(self.unk_token_id)

    def __len__(self) -> int:
        return self.tekken.n_words

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        """{"input_ids": the ids of `text`} (after `<s>` with `add_special_tokens`)."""
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self.tekken.encode(text, bos=add_special_tokens, eos=False)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        policy = SpecialTokenPolicy.IGNORE if skip_special_tokens else SpecialTokenPolicy.KEEP
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        return self.tekken.decode(ids, special_token_policy=policy)

    def convert_tokens_to_ids(self, token: str) -> int:
        """The id of a control token by name (`[AUDIO]`, `</s>`), `unk_token_id` for anything else."""
        try:
            return self.tekken.get_special_token(token)
        except ValueError:
            return self.unk_token_id


# ---- audio ----------------------------------------------------------------------------------


class ChunkedFrontEnd(FeatureExtractorFrontEnd):
    """Whisper log-mel of clips padded with silence to whole chunks, as `VoxtralProcessor` makes
    them: features [N, M, C*T] (C the most chunks of any clip; shorter clips padded further) and
    each clip's frames [N], a whole number of chunks.

    Args:
        extractor: the checkpoint's `WhisperFeatureExtractor`.
        chunk_samples: samples per chunk (tekken.json's chunk_length_s x sampling_rate).
        max_chunks: the most chunks a clip may have.
    """

    def __init__(self, extractor: Any, *, chunk_samples: int, max_chunks: int) -> None:
        super().__init__(extractor, pad_to_max=False)
        self.chunk_samples = chunk_samples
        self.chunk_frames = chunk_samples // self.hop
        self.max_frames = max_chunks * self.chunk_frames

    def chunks(self, samples: int) -> int:
        """Chunks of a clip of `samples` samples: one per started chunk."""
        return max(1, -(-samples // self.chunk_samples))

    def frames(self, samples: int) -> int:
        return self.chunks(samples) * self.chunk_frames

    def __call__(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        padded = [np.asarray(c, dtype=np.float32) for c in clips]
        padded = [np.pad(c, (0, self.chunks(len(c)) * self.chunk_samples - len(c))) for c in padded]  # whole chunks
        out = self.extractor(
            padded,
            sampling_rate=SAMPLE_RATE,
            padding="longest",
            truncation=False,  # never cut to one window
            return_attention_mask=True,
            return_tensors="pt",
        )
        # The log-mel's floor (max - 8) is per clip and silence never raises the max, so padding
        # a clip further (to the batch's longest) leaves its own chunks' features as they are.
        return out["input_features"].float(), out["attention_mask"].sum(-1).long()  # [N, M, C*T], [N]


class VoxtralEncoder(nn.Module):
    """Voxtral's audio tower as `SpeechLM` calls an encoder: each clip's chunks side by side in
    time, log-mel [N, M, C*T] with `frames` [N] (whole chunks) -> hidden [N, C*T/2, D] with each
    clip's chunks in order, and valid lengths [N] (zero past a clip's own chunks)."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    def __init__(self, tower: nn.Module, *, max_chunks: int) -> None:
        super().__init__()
        self.tower = tower
        config = cast("PreTrainedConfig", tower.config)
        self.dim: int = config.hidden_size
        self.chunk_frames: int = 2 * config.max_source_positions  # a chunk's mel frames; the conv halves them
        self.max_frames = max_chunks * self.chunk_frames

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """One encoder frame per two mel frames (every chunk whole, padding included)."""
        return frames // 2

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, mels, total = features.shape
        size = self.chunk_frames
        if total % size or bool((frames % size).any()):
            raise ValueError(f"Voxtral's encoder reads whole chunks of {size} frames, got {total} ({frames.tolist()})")
        chunks = total // size
        rows = features.unflatten(-1, (chunks, size)).transpose(1, 2)  # [N, M, C*T] -> [N, C, M, T]
        valid = torch.arange(chunks, device=frames.device)[None] < (frames // size)[:, None]  # [N, C]
        # Only real chunks are encoded, clip by clip in order: [K, M, T] -> [K, T/2, D].
        hidden = self.tower(rows[valid]).last_hidden_state
        out = hidden.new_zeros(n, chunks, size // 2, hidden.shape[-1])  # [N, C, T/2, D]
        out[valid.to(out.device)] = hidden
        return out.flatten(1, 2), self.output_lengths(frames)  # [N, C*T/2, D]


class FrameStackProjector(nn.Module):
    """Voxtral's projector as `SpeechLM` calls one: `stack` consecutive encoder frames, side by
    side, -> one LM embedding (a chunk's frames divide evenly, so no token spans two chunks)."""

    def __init__(self, module: nn.Module, stack: int) -> None:
        super().__init__()
        self.module = module
        self.stack = stack

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        return frames // self.stack

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        n, length, dim = hidden.shape
        if length % self.stack:
            raise ValueError(f"the projector stacks {self.stack} frames; got {length}")
        return self.module(
            hidden.reshape(n, length // self.stack, self.stack * dim)
        )  # [N, T'/k, k*D] -> [N, T'/k, D_lm]


# ---- prompts --------------------------------------------------------------------------------

_CLIP = None  # a clip's place among a turn's text parts


class VoxtralPrompts(SpeechProcessor):
    """Conversations -> Voxtral's prompt ids, as mistral-common's tokenizer v7 lays out a chat
    (see the module doc): consecutive user (or assistant) turns are merged, text parts joined
    by a blank line, system turns kept in place. Tool turns are not read."""

    JOIN = "\n\n"  # mistral-common's separator of text parts and of merged turns

    def __init__(
        self, tokenizer: TekkenText, audio_tokens: Callable[[int], int], featurize: Any, *, max_seconds: float
    ) -> None:
        super().__init__(
            tokenizer,
            audio_tokens,
            featurize,
            max_seconds=max_seconds,
            audio_token=AUDIO_TOKEN,
            audio_text=BEGIN_AUDIO + AUDIO_TOKEN,
        )
        control = tokenizer.tekken.get_special_token
        self.begin_inst, self.end_inst = control("[INST]"), control("[/INST]")
        self.begin_system, self.end_system = control("[SYSTEM_PROMPT]"), control("[/SYSTEM_PROMPT]")
        self.begin_audio, self.transcribe = control(BEGIN_AUDIO), control("[TRANSCRIBE]")

    def encode_messages(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = False, with_labels: bool = False
    ) -> Example:
        if not messages:
            raise MessageError("a conversation needs at least one message")
        clips: list[Clip] = []
        turns = self._turns([self._parts(m, i, clips) for i, m in enumerate(messages)])
        pieces = self._transcription(turns) or [
            (self._turn_ids(role, parts), role == "assistant") for role, parts in turns
        ]
        ids, labels = [self.tokenizer.bos_token_id], [IGNORE_INDEX]
        for piece, trained in pieces:
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return self._expand(ids, labels if with_labels else None, clips)

    def _check_text(self, text: str, index: int) -> str:
        # Any text is allowed: the tokenizer never reads "[AUDIO]" in text as the control token.
        if not isinstance(text, str):
            raise MessageError(f"message {index} has text that is not a string")
        return text

    def _parts(self, message: dict, index: int, clips: list[Clip]) -> tuple[str, list[str | None]]:
        """A message's role and content parts: text, or `_CLIP` where a clip is (added to `clips`).
        Each part goes through `_flatten`, which checks roles, types and clip lengths."""
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not content:
            flat = self._flatten(message, index, clips)
            return flat["role"], [flat["content"]]
        parts: list[str | None] = []
        for part in content:
            before = len(clips)
            flat = self._flatten({**message, "content": [part]}, index, clips)
            parts.append(_CLIP if len(clips) > before else flat["content"])
        return flat["role"], parts

    def _turns(self, messages: list[tuple[str, list[str | None]]]) -> list[tuple[str, list[str | None]]]:
        """Consecutive user (or assistant) messages as one turn, text parts joined, as
        mistral-common's request normaliser merges them; empty text is dropped."""
        turns: list[tuple[str, list[list[str | None]]]] = []
        for role, parts in messages:
            if role == "tool":
                raise MessageError("Voxtral's prompts have no tool turns")
            if turns and turns[-1][0] == role and role != "system":
                turns[-1][1].append(parts)
            else:
                turns.append((role, [parts]))
        return [(role, self._join(groups)) for role, groups in turns]

    def _join(self, groups: list[list[str | None]]) -> list[str | None]:
        """Adjacent text parts as one text (a blank line between them), clips where they are."""
        out: list[str | None] = []
        text: list[str] = []
        for part in (part for parts in groups for part in parts):
            if part is _CLIP:
                if text:
                    out.append("".join(text))
                    text = []
                out.append(_CLIP)
            elif part:
                text.append(self.JOIN + part if text else part)
        return out + (["".join(text)] if text else [])

    def _turn_ids(self, role: str, parts: list[str | None]) -> list[int]:
        encode = self.tokenizer.encode
        if role == "system":
            return [self.begin_system, *encode(_text(parts)), self.end_system]
        if role == "assistant":
            text = _text(parts).rstrip(" ")  # as mistral-common writes a reply
            if not text:
                raise MessageError("an assistant turn needs text")
            return [*encode(text), self.tokenizer.eos_token_id]
        body = [
            token
            for part in parts
            for token in ([self.begin_audio, self.audio_token_id] if part is _CLIP else encode(part))
        ]
        return [self.begin_inst, *body, self.end_inst]

    def _transcription(self, turns: list[tuple[str, list[str | None]]]) -> list[tuple[list[int], bool]] | None:
        """(ids, trained) pieces of Voxtral's transcription request when `turns` are one clip asked
        for with the transcribe tag, then at most the transcript (its tags dropped); None for
        any other chat."""
        if [role for role, _ in turns] not in (["user"], ["user", "assistant"]):
            return None
        parts = turns[0][1]
        if len(parts) != 2 or parts[0] is not _CLIP or parts[1] is _CLIP:
            return None
        asked, language = _transcription_ask(parts[1])
        if not asked:
            return None
        encode = self.tokenizer.encode
        named = encode(f"lang:{language}") if language else []  # as mistral-common writes it, no space
        prompt = [self.begin_inst, self.begin_audio, self.audio_token_id, self.end_inst, *named, self.transcribe]
        if len(turns) == 1:
            return [(prompt, False)]
        words = strip_tags(_text(turns[1][1]))
        return [(prompt, False), ([*encode(words), self.tokenizer.eos_token_id], True)]


def _text(parts: list[str | None]) -> str:
    """A system or assistant turn's text: its parts joined (only user turns hold clips: `_flatten` checks)."""
    return "".join(cast(list[str], parts))


def _transcription_ask(text: str) -> tuple[bool, str | None]:
    """Whether `text` is voxtune's transcribe tag alone, or with one language tag; and that language."""
    rest = text.replace(tag("task", "transcribe"), "", 1)
    languages = tag_values(rest, "lang")[:1]
    for code in languages:
        rest = rest.replace(tag("lang", code), "", 1)
    return rest != text and not rest.strip(), (languages[0] if languages else None)


# ---- the model ------------------------------------------------------------------------------


class VoxtralSpeechLM(PretrainedSpeechLM):
    """A Voxtral checkpoint in `SpeechLM`'s slots (see the module doc).

    Args:
        text: the tokenizer voxtune calls (the processor keeps its own backend).
        max_seconds: the longest clip.
        parts: `PretrainedSpeechLM`'s arguments.
    """

    def __init__(self, *, text: TekkenText, max_seconds: float, **parts: Any) -> None:
        self._text, self._max_seconds = text, max_seconds  # read by _make_processor, during __init__
        super().__init__(**parts)
        self.tokenizer = text

    @property
    def family(self) -> Family:
        """Mistral's: `</s>` ends a reply; LoRA on the attention and MLP layers."""
        return FAMILIES["mistral"]

    def _make_processor(self) -> SpeechProcessor:
        return VoxtralPrompts(self._text, self.audio_tokens, self.featurize, max_seconds=self._max_seconds)

    def transcription_messages(self, audio: Any, language: str | None = None) -> list[dict]:
        """The clip and voxtune's transcribe tag (and the language's), which `VoxtralPrompts`
        lays out as Voxtral's own transcription request."""
        from voxtune.model.prompts import transcribe_messages

        return transcribe_messages(audio, language)


def audio_settings(backend: Any) -> Any:
    """The tokenizer's audio config (mistral-common `AudioConfig`), or None when it has none."""
    encoder = backend.tokenizer.instruct_tokenizer.audio_encoder
    return encoder.audio_config if encoder is not None else None


def load(path: Path, dtype: torch.dtype) -> VoxtralSpeechLM:
    """A Voxtral checkpoint directory (`VoxtralForConditionalGeneration` + `VoxtralProcessor`).

    Raises:
        ModelLoadError: mistral-common is not installed, or the tokenizer's audio settings do
            not match the encoder's.
    """
    from voxtune.model.checkpoint import ModelLoadError

    if not mistral_common_available():
        raise ModelLoadError(f"{path} is a Voxtral checkpoint, whose tokenizer needs mistral-common: {INSTALL}")
    from transformers import VoxtralForConditionalGeneration

    processor = load_processor(path)
    model = load_weights(VoxtralForConditionalGeneration, path, dtype)
    # VoxtralConfig makes configs of the dicts it is given: its audio and text configs are never dicts or None.
    audio, tower_config = audio_settings(processor.tokenizer), cast("PreTrainedConfig", model.config.audio_config)
    if audio is None or audio.chunk_length_s is None:
        raise ModelLoadError(
            f"{path / 'tekken.json'} has no audio section with chunk_length_s: not a Voxtral tokenizer"
        )
    extractor = processor.feature_extractor
    chunk_samples = round(audio.chunk_length_s * audio.sampling_rate)
    if (
        audio.sampling_rate != SAMPLE_RATE
        or chunk_samples // extractor.hop_length != 2 * tower_config.max_source_positions
    ):
        raise ModelLoadError(
            f"{path}: tekken.json's {audio.chunk_length_s:g} s chunks at {audio.sampling_rate} Hz are not the "
            f"encoder's {2 * tower_config.max_source_positions} frames of {extractor.hop_length} samples "
            f"at {SAMPLE_RATE} Hz"
        )
    stack, left = divmod(tower_config.intermediate_size, tower_config.hidden_size)
    if left or (tower_config.max_source_positions % stack):
        raise ModelLoadError(
            f"{path / 'config.json'}: the projector's input ({tower_config.intermediate_size}) is not "
            f"whole encoder frames of {tower_config.hidden_size} within a chunk"
        )
    tokens_per_chunk = tower_config.max_source_positions // stack
    context = cast("PreTrainedConfig", model.config.text_config).max_position_embeddings
    max_chunks = max(1, min(int(MAX_AUDIO_SECONDS // audio.chunk_length_s), context // tokens_per_chunk))
    inner = model.model
    return VoxtralSpeechLM(
        text=TekkenText(processor.tokenizer),
        max_seconds=max_chunks * chunk_samples / SAMPLE_RATE,
        architecture="voxtral",
        model=model,
        processor=processor,
        encoder=VoxtralEncoder(inner.audio_tower, max_chunks=max_chunks),
        projector=FrameStackProjector(inner.multi_modal_projector, stack),
        lm=causal_lm_view(model.config.text_config, inner.language_model, model.lm_head),
        front_end=ChunkedFrontEnd(extractor, chunk_samples=chunk_samples, max_chunks=max_chunks),
        audio_token=AUDIO_TOKEN,
        audio_text=BEGIN_AUDIO + AUDIO_TOKEN,
    )


# ---- tiny checkpoints -----------------------------------------------------------------------

# Tekken's pre-tokenisation pattern (tiktoken `pat_str`) of Mistral's tokenizers.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# mistral-common's first control tokens (ranks 0-19), then Voxtral's audio ones.
CONTROL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)
AUDIO_CONTROL = {24: AUDIO_TOKEN, 25: BEGIN_AUDIO, 26: "[TRANSCRIBE]"}


def tekken_json(*, chunk_seconds: float, num_special: int = 32) -> dict[str, Any]:
    """A tekken.json (version v7) with one token per byte and no merges, the control tokens
    Voxtral reads, and its audio section with `chunk_seconds`-long chunks."""
    names = {rank: token for rank, token in enumerate(CONTROL_TOKENS)} | AUDIO_CONTROL
    return {
        "config": {
            "pattern": TEKKEN_PATTERN,
            "num_vocab_tokens": 256,
            "default_vocab_size": 256 + num_special,
            "default_num_special_tokens": num_special,
            "version": "v7",
        },
        "vocab": [
            {"rank": b, "token_bytes": base64.b64encode(bytes([b])).decode(), "token_str": None} for b in range(256)
        ],
        "special_tokens": [
            {"rank": r, "token_str": names.get(r, f"<SPECIAL_{r}>"), "is_control": True} for r in range(num_special)
        ],
        "audio": {
            "sampling_rate": SAMPLE_RATE,
            "frame_rate": 12.5,
            "chunk_length_s": chunk_seconds,
            "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
        },
    }


def tiny(
    directory: str | os.PathLike,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    encoder_dim: int = 32,
    encoder_layers: int = 2,
    chunk_seconds: float = 2,
    init_std: float = 0.02,
    seed: int = 0,
) -> Path:
    """A random Voxtral (`VoxtralForConditionalGeneration` + `VoxtralProcessor`, tekken.json written
    here) with `chunk_seconds`-long chunks (real checkpoints: 30 s), 12.5 tokens per second."""
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration, VoxtralProcessor, WhisperFeatureExtractor
    from transformers.tokenization_mistral_common import MistralCommonBackend

    from voxtune.model.architectures.tiny import save_tiny

    frames = round(chunk_seconds * 100)  # 10 ms mel frames
    if frames % 8 or abs(frames - chunk_seconds * 100) > 1e-6:
        raise ValueError(f"a chunk must be a whole number of 80 ms tokens, got {chunk_seconds} s")
    with tempfile.TemporaryDirectory() as scratch:  # the backend reads its file; the processor copies it
        tekken = Path(scratch) / "tekken.json"
        tekken.write_text(json.dumps(tekken_json(chunk_seconds=chunk_seconds)))
        tokenizer = MistralCommonBackend(tokenizer_path=tekken)
        config = VoxtralConfig(
            # The projector stacks 4 encoder frames, so its input (intermediate_size) is 4 x the width.
            audio_config={
                "hidden_size": encoder_dim,
                "intermediate_size": 4 * encoder_dim,
                "num_hidden_layers": encoder_layers,
                "num_attention_heads": 2,
                "max_source_positions": frames // 2,
                "initializer_range": init_std,
            },
            text_config={
                "hidden_size": hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": heads // 2,
                "head_dim": hidden // heads,
                "intermediate_size": 2 * hidden,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 2048,
                "initializer_range": init_std,
            },
            audio_token_id=cast(int, tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)),  # one token's id
        )
        extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=chunk_seconds, sampling_rate=SAMPLE_RATE)
        return save_tiny(
            VoxtralForConditionalGeneration, config, VoxtralProcessor(extractor, tokenizer), directory, seed
        )
