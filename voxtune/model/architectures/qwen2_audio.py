"""Qwen2-Audio (`model_type: qwen2_audio`): a Whisper-large encoder with 2x average pooling,
a linear projector and a Qwen2 LM.

Audio: Whisper log-mel, 128 bins, always padded to 30 s (the encoder's positional table is
1500 frames); the valid frames set the attention mask and the token count,
n = ((frames - 1) // 2 + 1 - 2) // 2 + 1, about 25 tokens per second. A clip is written
`<|audio_bos|><|AUDIO|><|audio_eos|>` and `<|AUDIO|>` is repeated n times.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from voxtune.model.architectures.pretrained import (
    FeatureExtractorFrontEnd,
    PretrainedSpeechLM,
    TokenProjector,
    causal_lm_view,
    load_processor,
    load_weights,
)

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


class Qwen2AudioEncoder(nn.Module):
    """Qwen2-Audio's audio tower as `SpeechLM` calls an encoder: log-mel [N, M, T] (T = the full
    window) with valid `frames` [N] -> hidden [N, T/4, D] and valid lengths [N]."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        config = cast("PreTrainedConfig", tower.config)
        self.dim: int = config.d_model
        self.max_frames: int = 2 * config.max_source_positions  # the conv's stride 2 halves them

    @staticmethod
    def conv_lengths(frames: torch.Tensor) -> torch.Tensor:
        """Frames after the stride-2 convolution: where attention runs."""
        return (frames - 1) // 2 + 1

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames after the 2x average pooling: one audio token each."""
        return (self.conv_lengths(frames) - 2) // 2 + 1

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        if features.shape[-1] != self.max_frames:
            raise ValueError(f"Qwen2-Audio's encoder reads exactly {self.max_frames} frames, got {features.shape[-1]}")
        positions = torch.arange(self.max_frames // 2, device=features.device)
        valid = (positions[None] < self.conv_lengths(frames)[:, None]).long()  # [N, T/2]
        # The mask builder reads only the shape, dtype and device of the embeddings.
        dummy = torch.zeros(*valid.shape, 1, dtype=features.dtype, device=features.device)
        config = cast("PreTrainedConfig", self.tower.config)
        mask = create_bidirectional_mask(config=config, inputs_embeds=dummy, attention_mask=valid)
        hidden = self.tower(features, attention_mask=mask).last_hidden_state  # [N, T/4, D]
        return hidden, self.output_lengths(frames)


def load(path: Path, dtype: torch.dtype) -> PretrainedSpeechLM:
    """A Qwen2-Audio checkpoint directory (base or instruct) as a `PretrainedSpeechLM`."""
    from transformers import Qwen2AudioForConditionalGeneration

    processor = load_processor(path)
    model = load_weights(Qwen2AudioForConditionalGeneration, path, dtype)
    inner = model.model
    audio_text = f"{processor.audio_bos_token}{processor.audio_token}{processor.audio_eos_token}"
    return PretrainedSpeechLM(
        architecture="qwen2_audio",
        model=model,
        processor=processor,
        encoder=Qwen2AudioEncoder(inner.audio_tower),
        projector=TokenProjector(inner.multi_modal_projector),
        lm=causal_lm_view(model.config.text_config, inner.language_model, model.lm_head),
        front_end=FeatureExtractorFrontEnd(processor.feature_extractor, pad_to_max=True),
        audio_token=processor.audio_token,
        audio_text=audio_text,
    )


def tiny(
    directory: str | os.PathLike,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    encoder_dim: int = 32,
    encoder_layers: int = 2,
    encoder_heads: int = 2,
    seconds: int = 1,
    tokenizer: Any = None,
    seed: int = 0,
) -> Path:
    """A random Qwen2-Audio (`Qwen2AudioForConditionalGeneration` + `Qwen2AudioProcessor`) with a
    `seconds`-long encoder window (real checkpoints: 30 s). `tokenizer`: a fast tokenizer with
    ChatML markers to use (its audio tokens are added); default one token per byte."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Tokenizer,
        WhisperFeatureExtractor,
    )

    from voxtune.model.architectures.tiny import CHATML, byte_tokenizer, save_tiny

    audio = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
    if tokenizer is None:
        tokenizer = byte_tokenizer(Qwen2Tokenizer, audio, CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:
        tokenizer.add_tokens(list(audio.values()), special_tokens=True)
    config = Qwen2AudioConfig(
        audio_config={
            "d_model": encoder_dim,
            "encoder_layers": encoder_layers,
            "encoder_attention_heads": encoder_heads,
            "encoder_ffn_dim": 2 * encoder_dim,
            "num_mel_bins": 128,
            "max_source_positions": 50 * seconds,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2,
            "intermediate_size": 2 * hidden,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
        audio_token_index=tokenizer.convert_tokens_to_ids(audio["audio_token"]),
    )
    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=seconds, sampling_rate=16000)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    return save_tiny(Qwen2AudioForConditionalGeneration, config, processor, directory, seed)
