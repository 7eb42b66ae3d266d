"""Put a `SpeechLM` together from an LM, its tokenizer and an encoder config."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from voxtune.model.projector import Projector
from voxtune.model.registry import family_of
from voxtune.model.speech_lm import SpeechLM, SpeechLMConfig, build_encoder, encoder_config_dict
from voxtune.tags import AUDIO_TOKEN, special_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Encoder frames stacked per audio token, for about 12.5 audio tokens per second.
DEFAULT_STACK = {"streaming": 2, "whisper": 4}


def prepare_tokenizer(tokenizer: Any, model_type: str) -> Any:
    """Give `tokenizer` what voxtune needs: the audio placeholder (special: never printed), the
    tag tokens (ordinary added tokens: a reply's tags stay in its text), a pad token and a chat
    template (the family's when it has none). Returns the same tokenizer."""
    family = family_of(model_type)
    vocabulary = tokenizer.get_vocab()
    # The family's chat markers must be single tokens, or the fallback template would spell
    # them out in pieces and generation would never see its end-of-turn token.
    tokenizer.add_tokens([t for t in family.special_tokens if t not in vocabulary], special_tokens=True)
    tokenizer.add_tokens([AUDIO_TOKEN], special_tokens=True)
    tokenizer.add_tokens([token for token in special_tokens() if token != AUDIO_TOKEN])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked, so any id will do
    if not tokenizer.chat_template:
        tokenizer.chat_template = family.chat_template
    return tokenizer


def build_speech_lm(
    lm: PreTrainedModel,
    tokenizer: Any,
    *,
    encoder_kind: str,
    encoder_config: dict[str, Any] | Any,
    projector_stack: int | None = None,
    projector_hidden: int | None = None,
    projector_norm_mid: bool | None = None,
) -> SpeechLM:
    """A `SpeechLM` around `lm` with a new (randomly initialised) encoder and projector.

    The tokenizer is prepared (see `prepare_tokenizer`) and the LM's embeddings grow to its
    vocabulary, new rows starting at the mean of the old ones. The projector's second norm sits
    between its layers by default for a Whisper encoder (the Ultravox v0.5 layout, which exports
    exactly to vLLM and llama.cpp), after them for the streaming encoder (no export target).
    """
    tokenizer = prepare_tokenizer(tokenizer, lm.config.model_type)
    if cast(nn.Embedding, lm.get_input_embeddings()).num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    encoder_config = encoder_config_dict(encoder_kind, encoder_config)
    encoder = build_encoder(encoder_kind, encoder_config)
    stack = projector_stack or DEFAULT_STACK[encoder_kind]
    hidden = projector_hidden or 2 * lm.config.hidden_size
    norm_mid = encoder_kind == "whisper" if projector_norm_mid is None else projector_norm_mid
    projector = Projector(encoder.dim, lm.config.hidden_size, stack=stack, hidden=hidden, norm_mid=norm_mid)
    config = SpeechLMConfig(
        encoder_kind=encoder_kind,
        encoder=encoder_config,
        projector_stack=stack,
        projector_hidden=hidden,
        n_mels=int(encoder_config.get("n_mels", encoder_config.get("num_mel_bins", 80))),
        projector_norm_mid=norm_mid,
    )
    return SpeechLM(encoder, projector, lm, tokenizer, config)


def compose(
    lm: str | os.PathLike,
    encoder: str | os.PathLike | dict[str, Any],
    *,
    projector_stack: int | None = None,
    projector_hidden: int | None = None,
    projector_norm_mid: bool | None = None,
    dtype: Any = None,
) -> SpeechLM:
    """A new `SpeechLM` from pretrained parts, ready to fine-tune.

    Args:
        lm: a causal-LM checkpoint directory or Hugging Face repo id (its tokenizer comes along).
        encoder: a Whisper checkpoint directory or repo id (its encoder weights are loaded), or
            a `StreamingEncoderConfig`-style dict for a new streaming encoder.
        projector_stack, projector_hidden: projector shape (defaults: ~12.5 tokens/s, 2x LM width).
        projector_norm_mid: the projector's second norm between its layers (default: with a
            Whisper encoder), else after them.
        dtype: the LM's dtype (default float32).

    Hub ids are resolved through the Hugging Face cache, downloading only what is named here.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm)
    language_model = AutoModelForCausalLM.from_pretrained(lm, dtype=dtype or torch.float32)
    if isinstance(encoder, dict):
        return build_speech_lm(
            language_model,
            tokenizer,
            encoder_kind="streaming",
            encoder_config=encoder,
            projector_stack=projector_stack,
            projector_hidden=projector_hidden,
            projector_norm_mid=projector_norm_mid,
        )
    from transformers import WhisperConfig

    from voxtune.model.checkpoint import resolve
    from voxtune.model.whisper_encoder import load_whisper_encoder

    whisper_dir = resolve(encoder)
    model = build_speech_lm(
        language_model,
        tokenizer,
        encoder_kind="whisper",
        encoder_config=WhisperConfig.from_pretrained(whisper_dir),
        projector_stack=projector_stack,
        projector_hidden=projector_hidden,
        projector_norm_mid=projector_norm_mid,
    )
    model.encoder.load_state_dict(load_whisper_encoder(whisper_dir).state_dict())
    return model
