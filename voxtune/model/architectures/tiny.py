"""Tiny random checkpoints of the architectures voxtune reads, built offline and saved in each
architecture's own layout (config, weights, tokenizer, processor files): what the tests and
benchmarks load through the real loading code, since real checkpoints cannot be downloaded.

    path = tiny_checkpoint("qwen2_audio", "out/tiny-qwen2-audio")
    model = voxtune.load(path)
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import torch

# Chat markers of the Qwen family's tiny tokenizers (ChatML).
CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def byte_tokenizer(tokenizer_class: Any, named: dict[str, str], others: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """A byte-level BPE tokenizer with no merges (one token per byte) plus special tokens:
    `named` ({attribute: token}) become tokenizer attributes (`tok.audio_token`...), `others`
    plain special tokens. Special tokens are added as such, so text never splits them."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    for token in (*others, *named.values()):
        vocab.setdefault(token, len(vocab))
    tokenizer = tokenizer_class(vocab=vocab, merges=[], extra_special_tokens=named, **kwargs)
    tokenizer.add_tokens([t for t in others if t not in named.values()], special_tokens=True)
    return tokenizer


def save_tiny(model_class: Any, config: Any, processor: Any, directory: str | os.PathLike, seed: int) -> Path:
    """Build `model_class(config)` with random weights (seeded) and save it with `processor`."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    path = Path(directory)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_checkpoint(architecture: str, directory: str | os.PathLike, **sizes: Any) -> Path:
    """Build and save a tiny random checkpoint of `architecture` (a key of `ARCHITECTURES`,
    whose module's `tiny` builds it; `sizes` are that function's keyword arguments)."""
    from voxtune.model.architectures import ARCHITECTURES

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r} (there are: {', '.join(ARCHITECTURES)})")
    build = importlib.import_module(ARCHITECTURES[architecture]).tiny
    if "model_type" in inspect.signature(build).parameters:  # one module for several model types
        sizes.setdefault("model_type", architecture)
    return build(directory, **sizes)
