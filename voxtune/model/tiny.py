"""Tiny random `SpeechLM`s for tests and examples: built in code, tokenizer trained here, no downloads."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, WhisperConfig

from voxtune.config import Config
from voxtune.model.builder import build_speech_lm, prepare_tokenizer
from voxtune.model.registry import family_of
from voxtune.model.speech_lm import SpeechLM

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"

# Enough text in a few scripts for a small byte-level BPE to learn real merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. How are you today? I am fine, thank you.
Please transcribe the audio. What language is this? The speaker sounds happy and calm.
Add three to the number you hear. Seven plus five is twelve. Repeat after me: good morning.
Guten Morgen, wie geht es dir? Bonjour, comment allez-vous ? Buenos días, ¿cómo estás?
Доброе утро, как дела? 你好，今天天气很好。 नमस्ते, आप कैसे हैं? مرحبا، كيف حالك؟
one two three four five six seven eight nine ten eleven twelve hundred thousand
""".strip()


class TinyModel(Config):
    """A small random model built in code: for trying things out and for tests with the
    defaults, and trained from scratch with bigger settings (recipes/voxtune-tiny-v3)."""

    lm: str = "llama"
    encoder: Literal["streaming", "whisper"] = "streaming"
    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=2)
    mlp_ratio: float = Field(2.0, gt=0)
    encoder_dim: int = Field(32, ge=8)
    encoder_layers: int = Field(2, ge=1)
    encoder_heads: int = Field(2, ge=1)
    encoder_left_chunks: int = Field(2, ge=0)  # the streaming encoder's attention past, in 160 ms chunks
    # Encoder frames stacked into one audio token (default: the encoder kind's, about 12.5
    # tokens/s; the streaming encoder makes 25 frames/s, so 4 gives 6.25 tokens/s).
    projector_stack: int | None = Field(None, ge=1)
    vocab_size: int = Field(400, ge=300)  # of the byte-level BPE (voxtune's tag tokens come on top)
    # What the BPE learns its merges from: a few built-in sentences, or every text of the
    # training data (transcripts, answers, instructions), as a model trained from scratch wants.
    tokenizer_corpus: Literal["builtin", "data"] = "builtin"

    @model_validator(mode="after")
    def _heads_fit(self) -> TinyModel:
        # Rotary embeddings rotate pairs of channels: every head needs an even width.
        for width, heads, name in (
            (self.hidden, self.heads, "hidden/heads"),
            (self.encoder_dim, self.encoder_heads, "encoder_dim/encoder_heads"),
        ):
            if width % heads or (width // heads) % 2:
                raise ValueError(f"{name}: {width} must split into {heads} heads of an even width")
        if self.heads % 2:
            raise ValueError(f"heads must be even (they share heads // 2 key/value heads), got {self.heads}")
        return self


_DEFAULT = TinyModel()


def train_tokenizer(model_type: str = "llama", vocab_size: int = 400, corpus: str = _CORPUS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with the family's chat markers.

    Byte-level, so any text in any script tokenises; small, so tiny models stay tiny.
    """
    family = family_of(model_type)
    specials = [PAD, BOS, EOS, *family.special_tokens]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tokenizer.chat_template = family.chat_template
    return tokenizer


def tiny_lm_config(
    model_type: str,
    tokenizer: Any,
    *,
    hidden: int = _DEFAULT.hidden,
    layers: int = _DEFAULT.layers,
    heads: int = _DEFAULT.heads,
    mlp_ratio: float = _DEFAULT.mlp_ratio,
) -> Any:
    """A small config of `model_type` sized for `tokenizer`, with its special token ids
    (`heads` query heads sharing half as many key/value heads)."""
    if hidden % heads or heads % 2:
        raise ValueError(f"hidden ({hidden}) must split into an even number of heads ({heads})")
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(mlp_ratio * hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def tiny_encoder_config(
    kind: str,
    *,
    dim: int = _DEFAULT.encoder_dim,
    layers: int = _DEFAULT.encoder_layers,
    heads: int = _DEFAULT.encoder_heads,
    left_chunks: int = _DEFAULT.encoder_left_chunks,
    n_mels: int = 80,
) -> dict[str, Any]:
    """A small encoder config of `kind` ("streaming" or "whisper"); `left_chunks` is the
    streaming encoder's attention past, in 160 ms chunks."""
    if kind == "streaming":
        return {
            "n_mels": n_mels,
            "dim": dim,
            "layers": layers,
            "heads": heads,
            "chunk_frames": 4,
            "left_chunks": left_chunks,
        }
    if kind == "whisper":
        return WhisperConfig(
            num_mel_bins=n_mels,
            d_model=dim,
            encoder_layers=layers,
            encoder_attention_heads=heads,
            encoder_ffn_dim=2 * dim,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=2 * dim,
            max_source_positions=1500,
            vocab_size=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ).to_dict()
    raise ValueError(f"unknown encoder kind {kind!r} (choose streaming or whisper)")


def tiny(
    lm: str = _DEFAULT.lm,
    encoder: str = _DEFAULT.encoder,
    *,
    seed: int = 0,
    projector_norm_mid: bool | None = None,
    corpus: str = _CORPUS,
    encoder_config: dict[str, Any] | None = None,
    **sizes: Any,
) -> SpeechLM:
    """A small random `SpeechLM`: an LM of family `lm` and an encoder of kind `encoder`, sized
    by `TinyModel`'s fields (`sizes` override them: hidden, layers, heads, mlp_ratio,
    encoder_dim, encoder_layers, encoder_heads, encoder_left_chunks, projector_stack,
    vocab_size), a byte-level BPE trained on `corpus`, the projector's second norm between its
    layers or after them (`projector_norm_mid`; default: between with a Whisper encoder, see
    `build_speech_lm`). The defaults make a model for tests; bigger settings make one worth
    training from scratch (recipes/voxtune-tiny-v3). `encoder_config` replaces the encoder's
    settings whole (e.g. a pretrained Whisper's, whose weights the caller then loads).

    Raises:
        pydantic.ValidationError: a size that is not a `TinyModel` field, or out of its range.
    """
    settings = TinyModel(lm=lm, encoder=encoder, **sizes)
    lm, vocab_size = settings.lm, settings.vocab_size
    tokenizer = prepare_tokenizer(train_tokenizer(lm, vocab_size, corpus), lm)  # full vocabulary before the LM is sized
    s = settings
    lm_config = tiny_lm_config(lm, tokenizer, hidden=s.hidden, layers=s.layers, heads=s.heads, mlp_ratio=s.mlp_ratio)
    if encoder_config is None:
        encoder_config = tiny_encoder_config(
            s.encoder,
            dim=s.encoder_dim,
            layers=s.encoder_layers,
            heads=s.encoder_heads,
            left_chunks=s.encoder_left_chunks,
        )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(lm_config)
        speech_lm = build_speech_lm(
            model,
            tokenizer,
            encoder_kind=s.encoder,
            encoder_config=encoder_config,
            projector_stack=s.projector_stack,
            projector_norm_mid=projector_norm_mid,
        )
    return speech_lm.eval()
