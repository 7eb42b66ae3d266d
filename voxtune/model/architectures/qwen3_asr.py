"""Qwen3-ASR (`model_type: qwen3_asr`): Qwen3-Omni's audio tower design (three stride-2
convolutions per chunk, windowed attention), a two-layer projector and a Qwen3 LM.

Audio: 128-bin log-mel from its own feature extractor, which pads clips shorter than 0.5 s
with zeros (counted as audio) and the frame axis to whole chunks of 2 * n_window = 100
frames. Its processor pads a batch to its longest clip, not to a window, so each clip is
featurised alone here (`ClipwiseFrontEnd`): whole hops, the processor's numbers for a prompt's
clip. Each 100-frame chunk gives 13 tokens (12.5 a second), and the rest of a clip what the
convolutions leave of it. A clip is written `<|audio_start|><|audio_pad|><|audio_end|>`, and
`<|audio_pad|>` is repeated once per token.

Shape letters: N clips, M mel bins, T frames, T' encoder frames, D width.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from voxtune.model.architectures.pretrained import (
    PretrainedSpeechLM,
    TokenProjector,
    causal_lm_view,
    load_processor,
    load_weights,
)
from voxtune.model.architectures.qwen_omni import ClipwiseFrontEnd, conv_lengths

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


class Qwen3ASRAudioEncoder(nn.Module):
    """Qwen3-ASR's audio tower as `SpeechLM` calls an encoder: log-mel [N, M, T] with valid
    `frames` [N] -> hidden [N, T', D] and valid lengths [N]."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        config = cast("PreTrainedConfig", tower.config)
        self.dim: int = config.d_model
        self.chunk: int = 2 * config.n_window  # frames the convolutions read at a time
        self.max_frames = None  # chunked, windowed attention: no positional window to fit

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Each whole chunk's tokens (13 for 100 frames), then what the convolutions leave of the rest."""
        per_chunk = int(conv_lengths(torch.tensor(self.chunk), 3))
        return frames // self.chunk * per_chunk + conv_lengths(frames % self.chunk, 3)

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.pad(features, (0, -features.shape[-1] % self.chunk))  # [N, M, whole chunks]
        mask = (torch.arange(features.shape[-1], device=features.device)[None] < frames[:, None]).long()  # [N, T]
        hidden = self.tower(features, input_features_mask=mask).last_hidden_state  # [ΣT', D], clip by clip
        lengths = self.output_lengths(frames)
        return pad_sequence(hidden.split(lengths.tolist()), batch_first=True), lengths  # [N, T', D]


ASR_TEXT = "<asr_text>"  # between the language it names and the words
_LANGUAGE = "language"


class Qwen3ASRSpeechLM(PretrainedSpeechLM):
    """Qwen3-ASR transcribes what it hears without being asked, and writes
    `language <Name><asr_text><words>`."""

    def transcription_messages(self, audio: Any, language: str | None = None) -> list[dict]:
        """The clip alone (the model names the language itself)."""
        return [{"role": "user", "content": [{"type": "audio", "audio": audio}]}]

    def read_transcript(self, reply: str) -> tuple[str, str | None]:
        """The words after `<asr_text>` (none yet while the language is being written)."""
        _, marker, words = reply.partition(ASR_TEXT)
        if marker:
            return words.strip(), None
        text = reply.strip()
        writing_language = text.startswith(_LANGUAGE) or _LANGUAGE.startswith(text)
        return ("" if writing_language else text), None


def load(path: Path, dtype: torch.dtype) -> PretrainedSpeechLM:
    """A Qwen3-ASR checkpoint directory as a `PretrainedSpeechLM`."""
    from transformers import Qwen3ASRForConditionalGeneration

    processor = load_processor(path)
    model = load_weights(Qwen3ASRForConditionalGeneration, path, dtype)
    inner = model.model
    return Qwen3ASRSpeechLM(
        architecture="qwen3_asr",
        model=model,
        processor=processor,
        encoder=Qwen3ASRAudioEncoder(inner.audio_tower),
        projector=TokenProjector(inner.multi_modal_projector),
        lm=causal_lm_view(model.config.text_config, inner.language_model, model.lm_head),
        front_end=ClipwiseFrontEnd(processor.feature_extractor),
        audio_token=processor.audio_token,
        audio_text=f"{processor.audio_bos_token}{processor.audio_token}{processor.audio_eos_token}",
    )


# ChatML with a system turn always first, as Qwen3-ASR writes its (by default empty) context.
_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'audio' %}"
    "<|audio_start|><|audio_pad|><|audio_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny(
    directory: str | os.PathLike,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    encoder_dim: int = 32,
    encoder_layers: int = 2,
    seed: int = 0,
) -> Path:
    """A random Qwen3-ASR (`Qwen3ASRForConditionalGeneration` + `Qwen3ASRProcessor`)."""
    from transformers import (
        Qwen2Tokenizer,
        Qwen3ASRConfig,
        Qwen3ASRFeatureExtractor,
        Qwen3ASRForConditionalGeneration,
        Qwen3ASRProcessor,
    )

    from voxtune.model.architectures.tiny import CHATML, byte_tokenizer, save_tiny

    audio = {"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}
    tokenizer = byte_tokenizer(Qwen2Tokenizer, audio, CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    config = Qwen3ASRConfig(
        audio_config={
            "d_model": encoder_dim,
            "encoder_layers": encoder_layers,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 2 * encoder_dim,
            "num_mel_bins": 128,
            "output_dim": hidden,
            "downsample_hidden_size": 8,
            "n_window_infer": 400,
        },
        text_config={
            "model_type": "qwen3",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2,
            "head_dim": hidden // heads,
            "intermediate_size": 2 * hidden,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
        audio_token_id=tokenizer.convert_tokens_to_ids(audio["audio_token"]),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    processor = Qwen3ASRProcessor(
        feature_extractor=Qwen3ASRFeatureExtractor(), tokenizer=tokenizer, chat_template=_TEMPLATE
    )
    return save_tiny(Qwen3ASRForConditionalGeneration, config, processor, directory, seed)
