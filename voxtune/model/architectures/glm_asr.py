"""GLM-ASR (`model_type: glmasr`, GLM-ASR-Nano): a Whisper-style audio tower with rotary
positions and no attention mask, a projector that reads 4 encoder frames side by side, and a
Llama-layout LM that writes GLM-4 chats.

- Audio: Whisper log-mel, 128 bins, cut into 30 s windows as Audio Flamingo's processor cuts
  them (`WindowedFrontEnd`): each window featurised alone and padded to 3000 frames, which the
  tower reads whole, padding included (it takes no mask), as `GlmAsrModel` does. A window's
  1500 encoder frames are stacked 4 by 4 (the audio `intermediate_size` is 4 x its width) into
  375 tokens; a clip's valid tokens are its windows' joined in order.
- Tokens: the processor counts them on a clip's summed valid frames,
  n = (((frames - 1) // 2 + 1) - 4) // 4 + 1 (12.5 a second), which is the sum of the windows'
  own counts because a whole window's 1500 frames make whole tokens (window frames are a
  multiple of 8, which the stacking needs anyway).
- A clip is written as the processor's chat template writes an audio part (GLM-ASR-Nano:
  `<|begin_of_audio|><|pad|><|end_of_audio|>`, then a new `<|user|>` turn for the text), read
  from the template; `<|pad|>` is repeated once per token.
- Turns: GLM-4's `<|role|>\\n...`; nothing closes an assistant turn but the next turn's marker,
  so `<|user|>` is the end-of-turn (stop) token (`GLM4`; the tiny checkpoint's generation config
  stops there too). A trained reply is labelled with it after the reply, as the model ends a
  turn when it writes one (the processor adds it where the template writes no end-of-turn).

Shape letters: N clips, K windows, M mel bins, W frames of a window, T' tokens, D width.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from voxtune.model.architectures.audio_flamingo import (
    WindowedEncoder,
    WindowedFrontEnd,
    template_audio_text,
    transcription_request,
)
from voxtune.model.architectures.pretrained import (
    PretrainedSpeechLM,
    TokenProjector,
    causal_lm_view,
    load_processor,
    load_weights,
)
from voxtune.model.registry import Family

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

MERGE = 4  # encoder frames per token: fixed in GlmAsrProcessor's count

# GLM-4's chats as GLM-ASR-Nano writes them (its published prompt:
# `<|user|>\n<|begin_of_audio|><|pad|><|end_of_audio|><|user|>\n{text}<|assistant|>\n`).
GLM4_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'audio' %}<|begin_of_audio|><|pad|><|end_of_audio|><|user|>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GLM4 = Family("glm4", GLM4_TEMPLATE, ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"), "<|user|>")


class GlmAsrAudioEncoder(WindowedEncoder):
    """GLM-ASR's audio tower over 30 s windows (see `WindowedEncoder`), its frames stacked 4 by 4:
    hidden [N, T', 4 * D_tower]."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")

    def __init__(self, tower: nn.Module, *, window: int) -> None:
        super().__init__(tower, window=window, dim=cast("PreTrainedConfig", tower.config).intermediate_size)

    @staticmethod
    def conv_lengths(frames: torch.Tensor) -> torch.Tensor:
        """Frames after the convolutions (stride 1, then stride 2)."""
        return (frames - 1) // 2 + 1

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Whole groups of 4 frames after the convolutions: 12.5 tokens a second."""
        return (self.conv_lengths(frames) - MERGE) // MERGE + 1

    def encode_windows(self, windows: torch.Tensor, frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(windows).last_hidden_state  # [K, W/2, D_tower]: every frame, padding too
        return hidden.reshape(windows.shape[0], -1, self.dim)  # 4 frames side by side: [K, W/8, 4 * D_tower]


class GlmAsrSpeechLM(PretrainedSpeechLM):
    """A GLM-ASR checkpoint in `SpeechLM`'s slots, with GLM-4's turns (its LM's config says
    `llama`, whose family, Llama 3's turns, is not the one its tokenizer writes), asked for a
    transcript with its processor's own prompt, which names no language: the model hears it."""

    @property
    def family(self) -> Family:
        return GLM4

    def transcription_messages(self, audio: Any, language: str | None = None) -> list[dict]:
        return transcription_request(self.hf_processor, audio) or super().transcription_messages(audio, language)


def load(path: Path, dtype: torch.dtype) -> GlmAsrSpeechLM:
    """A GLM-ASR checkpoint directory as a `PretrainedSpeechLM`.

    Raises:
        ModelLoadError: the audio config does not stack 4 frames per token, or the feature
            extractor's window is not a whole number of tokens.
    """
    from transformers import GlmAsrForConditionalGeneration

    from voxtune.model.checkpoint import ModelLoadError

    processor = load_processor(path)
    model = load_weights(GlmAsrForConditionalGeneration, path, dtype)
    inner = model.model
    audio = cast("PreTrainedConfig", model.config.audio_config)  # GlmAsrConfig makes a config of a dict
    if audio.intermediate_size != MERGE * audio.hidden_size:
        raise ModelLoadError(
            f"{path}: the audio intermediate_size ({audio.intermediate_size}) must be {MERGE} x "
            f"its hidden_size ({audio.hidden_size}): the projector reads {MERGE} frames"
        )
    front_end = WindowedFrontEnd(processor.feature_extractor, max_seconds=processor.max_audio_len)
    if front_end.window % (2 * MERGE):
        raise ModelLoadError(
            f"{path}: the feature extractor's window ({front_end.window} frames) must be a multiple "
            f"of {2 * MERGE}: the tower halves it and the projector stacks {MERGE}"
        )
    return GlmAsrSpeechLM(
        architecture="glmasr",
        model=model,
        processor=processor,
        encoder=GlmAsrAudioEncoder(inner.audio_tower, window=front_end.window),
        projector=TokenProjector(inner.multi_modal_projector),
        lm=causal_lm_view(model.config.text_config, inner.language_model, model.lm_head),
        front_end=front_end,
        audio_token=processor.audio_token,
        audio_text=template_audio_text(processor),
    )


def tiny(
    directory: str | os.PathLike,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    encoder_dim: int = 32,
    encoder_layers: int = 2,
    seconds: int = 2,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """A random GLM-ASR (`GlmAsrForConditionalGeneration` + `GlmAsrProcessor`) with GLM-4's
    special tokens, a `seconds`-long window (real checkpoints: 30 s; 2 s is the shortest whose
    tokens are whole: 200 frames, 25 tokens) and tied input and output embeddings, as the
    config's default. `init_std` is the weights' initializer range."""
    from transformers import (
        GenerationConfig,
        GlmAsrConfig,
        GlmAsrForConditionalGeneration,
        GlmAsrProcessor,
        Qwen2Tokenizer,
        WhisperFeatureExtractor,
    )

    from voxtune.model.architectures.tiny import byte_tokenizer, save_tiny

    others = ("<|endoftext|>", "[gMASK]", "<sop>", *GLM4.special_tokens, "<|begin_of_audio|>", "<|end_of_audio|>")
    tokenizer = byte_tokenizer(
        Qwen2Tokenizer, {"audio_token": "<|pad|>"}, others, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    config = GlmAsrConfig(
        audio_config={
            "hidden_size": encoder_dim,
            "intermediate_size": MERGE * encoder_dim,
            "num_hidden_layers": encoder_layers,
            "num_attention_heads": 2,
            "num_mel_bins": 128,
            "initializer_range": init_std,
        },
        text_config={
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2,
            "intermediate_size": 2 * hidden,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048,
            "eos_token_id": stops,
            "initializer_range": init_std,
        },
        audio_token_id=tokenizer.convert_tokens_to_ids("<|pad|>"),
    )
    extractor = WhisperFeatureExtractor(
        feature_size=128, chunk_length=seconds, sampling_rate=16000, return_attention_mask=True
    )
    processor = GlmAsrProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=GLM4_TEMPLATE)
    path = save_tiny(GlmAsrForConditionalGeneration, config, processor, directory, seed)
    # Stop at the next turn's marker too, as the published generation config does.
    generation = GenerationConfig.from_pretrained(path)
    generation.eos_token_id = stops
    generation.save_pretrained(path)
    return path
