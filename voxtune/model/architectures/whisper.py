"""Whisper (`model_type: whisper`): an encoder-decoder speech recogniser, read from a transformers
checkpoint (`voxtune convert` makes one from a faster-whisper / CTranslate2 directory).

It fills `SpeechLM`'s slots as an encoder-decoder does: the encoder reads a 30 s window of
log-mel, and the decoder (the `lm` slot) cross-attends all of it instead of reading audio
embeddings at placeholders. Every conversation holds one clip, and the reply is its transcript:
Whisper only transcribes (text in a request can only name the language). Each batch row
cross-attends its own clip, so rows are padded, never packed; the engine keeps the
cross-attention keys beside the self-attention cache.

Prompt: `<|startoftranscript|>` then, for a multilingual model told the language,
`<|xx|><|transcribe|><|notimestamps|>` (English-only models: `<|notimestamps|>`). A
multilingual model not told the language writes its own language and task tokens, as Whisper
does when it detects the language.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, overload

import torch
import torch.nn.functional as F
from torch import nn

from voxtune.model.architectures.pretrained import (
    FeatureExtractorFrontEnd,
    PretrainedSpeechLM,
    TokenProjector,
    load_processor,
    load_weights,
)
from voxtune.model.processor import IGNORE_INDEX, Clip, Example, MessageError, SpeechProcessor
from voxtune.model.registry import Family
from voxtune.tags import strip_tags, tag_values

if TYPE_CHECKING:
    from transformers import PreTrainedConfig
    from transformers.models.whisper.modeling_whisper import WhisperDecoder


class WhisperEncoder(nn.Module):
    """Whisper's encoder as `SpeechLM` calls one: log-mel [N, M, T] (T = the 30 s window) -> the
    whole window's states [N, T/2, D]; every position is read by the decoder, so the lengths
    are the window's."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        config = cast("PreTrainedConfig", encoder.config)
        self.dim: int = config.d_model
        self.positions: int = config.max_source_positions
        self.max_frames = 2 * self.positions  # the second convolution has stride 2

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """The window's positions, whatever the clip's length."""
        return torch.full_like(frames, self.positions)

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(features).last_hidden_state  # [N, T/2, D]
        return hidden, self.output_lengths(frames)


class WhisperDecoderLM(nn.Module):
    """Whisper's decoder and output projection as the causal LM voxtune's generation and losses
    call, cross-attending `encoder_hidden_states` [B, S, D] (read once at prefill, then kept in
    the cache). `labels` are the usual unshifted ones (the loss shifts them)."""

    def __init__(self, decoder: WhisperDecoder, proj_out: nn.Module, generation_config: Any) -> None:
        super().__init__()
        self.decoder = decoder
        self.proj_out = proj_out
        self.config = decoder.config
        self.generation_config = generation_config

    def get_decoder(self) -> nn.Module:
        return self.decoder

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.proj_out

    def set_output_embeddings(self, head: nn.Module) -> None:
        self.proj_out = head

    def activation_checkpointing_enable(self, **options: Any) -> None:
        """Recompute the decoder layers' activations in the backward pass."""
        self.decoder.activation_checkpointing_enable(**options)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        encoder_hidden_states: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        from transformers import EncoderDecoderCache
        from transformers.modeling_outputs import CausalLMOutputWithPast

        prefill = past_key_values is not None and past_key_values.get_seq_length() == 0
        if encoder_hidden_states is None and isinstance(past_key_values, EncoderDecoderCache):
            # Decoding after the prefill: the cross-attention keys and values are in the cache,
            # and Whisper's layers read them only when some encoder states are passed.
            encoder_hidden_states = inputs_embeds.new_zeros(inputs_embeds.shape[0], 0, inputs_embeds.shape[-1])
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            encoder_hidden_states=encoder_hidden_states,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        logits = self.proj_out(hidden)  # [B, L, V]
        if labels is None and past_key_values is not None:
            logits = self._suppress(logits, first=prefill)
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].to(logits.device)  # position i predicts token i + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def _suppress(self, logits: torch.Tensor, *, first: bool) -> torch.Tensor:
        """Whisper's decoding rules, as its own `generate` applies them: the checkpoint's
        suppressed tokens never come, and its begin-suppressed ones (a space, the end) not
        first. Only when decoding with a cache: never in a loss."""
        generation = self.generation_config
        banned = list(getattr(generation, "suppress_tokens", None) or [])
        if first:
            banned += list(getattr(generation, "begin_suppress_tokens", None) or [])
        if not banned:
            return logits
        return logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))


class WhisperPrompts(SpeechProcessor):
    """Conversations -> Whisper decoder prompts: the conversation's one clip (in a user turn),
    the language from a `<|lang:xx|>` tag in the user's text, and the assistant's reply (tags
    stripped) as the transcript to train on."""

    def __init__(self, tokenizer: Any, featurize: Any, generation_config: Any, *, max_seconds: float) -> None:
        super().__init__(tokenizer, lambda samples: 0, featurize, max_seconds=max_seconds, audio_token=None)
        self.generation = generation_config
        self.multilingual = bool(getattr(generation_config, "is_multilingual", False))

    def prefix(self, language: str | None) -> list[int]:
        """The decoder's prompt before the transcript."""
        generation = self.generation
        ids = [generation.decoder_start_token_id]
        if not self.multilingual:
            return ids + [generation.no_timestamps_token_id]
        if language is None:
            return ids  # the model writes the language it hears, then the task
        language_id = (getattr(generation, "lang_to_id", None) or {}).get(f"<|{language}|>")
        if language_id is None:
            raise MessageError(f"this Whisper model does not know the language {language!r}")
        return ids + [language_id, generation.task_to_id["transcribe"], generation.no_timestamps_token_id]

    def encode_messages(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = False, with_labels: bool = False
    ) -> Example:
        if not messages:
            raise MessageError("a conversation needs at least one message")
        clips: list[Clip] = []
        flat = [self._flatten(message, index, clips) for index, message in enumerate(messages)]
        if len(clips) != 1:
            raise MessageError(f"a Whisper model transcribes one clip per request, got {len(clips)}")
        languages = [code for m in flat if m["role"] == "user" for code in tag_values(m["content"], "lang")]
        ids = self.prefix(languages[-1] if languages else None)
        labels = [IGNORE_INDEX] * len(ids)
        if flat[-1]["role"] == "assistant" and not add_generation_prompt:
            text = strip_tags(flat[-1]["content"]).strip()
            reply = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            ids, labels = ids + reply, labels + reply
        return Example(ids, labels if with_labels else None, clips)


# Whisper's decoder as an LM family: no chat template (WhisperPrompts lays out its prompts), its
# end token ends a reply, and adapters go on self- and cross-attention and the MLP.
WHISPER_DECODER = Family("whisper", "", (), None, lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))


class WhisperSpeechLM(PretrainedSpeechLM):
    """A Whisper checkpoint in `SpeechLM`'s slots (see the module doc)."""

    supports_packing = False
    # Its slots, as `load` fills them.
    encoder: WhisperEncoder
    lm: WhisperDecoderLM

    @property
    def family(self) -> Family:
        return WHISPER_DECODER

    def _make_processor(self) -> SpeechProcessor:
        return WhisperPrompts(
            self.tokenizer,
            self.featurize,
            self.lm.generation_config,
            max_seconds=self.encoder.max_frames * self.front_end.hop / 16000,
        )

    def audio_tokens(self, samples: int) -> int:
        """No prompt positions: the decoder cross-attends the audio."""
        return 0

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """The decoder's token embeddings [B, L, D] (the audio is cross-attended, not spliced)."""
        return self.lm.get_input_embeddings()(batch["input_ids"].to(self.device))

    def encoder_states(self, batch: dict[str, Any]) -> torch.Tensor:
        """Each row's clip encoded: [B, S, D] (one clip per row)."""
        clips = self.batch_clips(batch, self.encoder.dim)
        rows = batch["input_ids"].shape[0]
        if len(clips) != rows:
            raise ValueError(f"{rows} rows but {len(clips)} clips: a Whisper model reads one clip per row")
        dtype = cast(torch.Tensor, self.lm.proj_out.weight).dtype  # the head: a Linear, or peft's wrapper of one
        return torch.stack([clip.to(self.device, dtype) for clip in clips])

    def prompt_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"inputs_embeds": self.embed(batch), "encoder_hidden_states": self.encoder_states(batch)}

    def new_cache(self) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        return EncoderDecoderCache(DynamicCache(), DynamicCache())

    def lm_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "sequence_lengths" in batch:
            raise ValueError("a Whisper model cannot train on packed rows: each row cross-attends its own clip")
        mask = batch["attention_mask"].to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding (generation) shifts them
        return {**self.prompt_inputs(batch), "attention_mask": mask, "position_ids": positions}

    def transcription_messages(self, audio: Any, language: str | None = None) -> list[dict]:
        """The clip, and the language as a tag (WhisperPrompts reads it)."""
        from voxtune.model.prompts import transcribe_messages

        return transcribe_messages(audio, language)

    @overload
    def generate(self, messages: Sequence[dict], **sampling: Any) -> str: ...

    @overload
    def generate(self, messages: Sequence[Sequence[dict]], **sampling: Any) -> list[str]: ...

    def generate(self, messages: Sequence[dict] | Sequence[Sequence[dict]], **sampling: Any) -> str | list[str]:
        """The transcript of each conversation's clip (leading space trimmed, as Whisper writes one)."""
        replies = super().generate(messages, **sampling)
        return replies.strip() if isinstance(replies, str) else [reply.strip() for reply in replies]

    def stream(self, messages: Sequence[dict], **sampling: Any) -> Iterator[str]:
        pieces = super().stream(messages, **sampling)

        def trimmed() -> Iterator[str]:
            started = False
            for piece in pieces:
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    yield piece

        return trimmed()


def load(path: Path, dtype: torch.dtype) -> WhisperSpeechLM:
    """A Whisper checkpoint directory (`WhisperForConditionalGeneration` + `WhisperProcessor`)."""
    from transformers import WhisperForConditionalGeneration

    processor = load_processor(path)
    model = load_weights(WhisperForConditionalGeneration, path, dtype)
    generation = model.generation_config
    if getattr(generation, "no_timestamps_token_id", None) is None or generation.decoder_start_token_id is None:
        from voxtune.model.checkpoint import ModelLoadError

        raise ModelLoadError(
            f"{path / 'generation_config.json'} lacks Whisper's special token ids "
            "(decoder_start_token_id, no_timestamps_token_id)"
        )
    return WhisperSpeechLM(
        architecture="whisper",
        model=model,
        processor=processor,
        encoder=WhisperEncoder(model.model.encoder),
        projector=TokenProjector(nn.Identity()),
        lm=WhisperDecoderLM(model.model.decoder, model.proj_out, generation),
        front_end=FeatureExtractorFrontEnd(processor.feature_extractor, pad_to_max=True),
        audio_token="",
        audio_text="",
    )


def tiny(
    directory: str | os.PathLike,
    *,
    dim: int = 32,
    layers: int = 2,
    seconds: int = 1,
    languages: tuple[str, ...] = ("en", "de"),
    seed: int = 0,
) -> Path:
    """A random multilingual Whisper (`WhisperForConditionalGeneration` + `WhisperProcessor`)
    with a `seconds`-long window (real checkpoints: 30 s); `languages=()` makes an English-only
    one (as tiny.en)."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    from voxtune.model.architectures.tiny import byte_tokenizer, save_tiny

    specials = (
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in languages),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    )
    tokenizer = byte_tokenizer(
        WhisperTokenizer,
        {},
        specials,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=dim,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * dim,
        decoder_ffn_dim=2 * dim,
        max_source_positions=50 * seconds,
        max_target_positions=128,
        pad_token_id=ids["<|endoftext|>"],
        init_std=0.2,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=seconds, sampling_rate=16000)
    path = save_tiny(WhisperForConditionalGeneration, config, WhisperProcessor(extractor, tokenizer), directory, seed)
    generation = WhisperForConditionalGeneration.from_pretrained(path).generation_config
    whisper_ids = dict(
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=bool(languages),
        lang_to_id={f"<|{c}|>": ids[f"<|{c}|>"] for c in languages},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
    )
    for key, value in whisper_ids.items():  # Whisper's own fields, which GenerationConfig.update ignores
        setattr(generation, key, value)
    generation._from_model_config = False  # or transformers rebuilds it from config.json, without them
    generation.save_pretrained(path)
    return path
