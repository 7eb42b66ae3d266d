"""Ultravox (`model_type: ultravox`), read natively from its Hub layout, no remote code: a Whisper
encoder (`audio_tower.*`), a stacking SwiGLU projector (`multi_modal_projector.*`) and a causal
LM (`language_model.*`), with `<|audio|>` in the tokenizer.

The encoder reads any clip up to 30 s (no padding to the window, padding masked, as Ultravox's
modified Whisper encoder does), one encoder frame per 20 ms; the projector stacks `stack_factor`
frames, so a clip of T mel frames takes ceil(T / (2 * stack_factor)) tokens (6.25 per second
at 8). Projector layouts: v0.5+ (`projector_ln_mid: true`: RMSNorm before and in the middle)
and v0.4 (RMSNorm before and after). Checkpoints that name their parts instead of carrying them
(`audio_model_id`, `text_model_id`, as v0.4 releases do) have them resolved like any model name.
Saved back in the same layout, every part inline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from voxtune.model.architectures.pretrained import FeatureExtractorFrontEnd, PretrainedSpeechLM, read_config
from voxtune.tags import AUDIO_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from voxtune.model.whisper_encoder import WhisperEncoder

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class UltravoxProjector(nn.Module):
    """Stack `stack` encoder frames -> RMSNorm -> Linear -> SwiGLU -> (RMSNorm) -> Linear ->
    (RMSNorm), with Ultravox's names and order: `linear_1`'s output is [up; gate]."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, *, stack: int, ln_mid: bool) -> None:
        super().__init__()
        self.stack = stack
        self.ln_pre = nn.RMSNorm(in_dim * stack, eps=1e-6)
        self.linear_1 = nn.Linear(in_dim * stack, hidden, bias=False)
        self.ln_mid = nn.RMSNorm(hidden // 2, eps=1e-6) if ln_mid else nn.Identity()
        self.linear_2 = nn.Linear(hidden // 2, out_dim, bias=False)
        self.ln_post = nn.Identity() if ln_mid else nn.RMSNorm(out_dim, eps=1e-6)

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Audio tokens for each clip's encoder frames: ceil(frames / stack)."""
        return (frames + self.stack - 1) // self.stack

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """`frames` [N, T', D_enc] -> [N, ceil(T' / stack), D_lm]; the last group is zero-padded."""
        batch, length, dim = frames.shape
        pad = -length % self.stack
        stacked = F.pad(frames, (0, 0, 0, pad)).reshape(batch, (length + pad) // self.stack, self.stack * dim)
        up, gate = self.linear_1(self.ln_pre(stacked)).chunk(2, dim=-1)  # [N, T'/k, hidden / 2] each
        return self.ln_post(self.linear_2(self.ln_mid(F.silu(gate) * up)))


class UltravoxModel(nn.Module):
    """The three parts under Ultravox's names, so its state dict is the checkpoint's and peft
    names adapters as Ultravox's own model does; `save_pretrained` writes the Hub layout."""

    def __init__(
        self,
        config: dict[str, Any],
        audio_tower: WhisperEncoder,
        projector: UltravoxProjector,
        language_model: PreTrainedModel,
    ) -> None:
        super().__init__()
        self.config = config
        self.audio_tower = audio_tower
        self.multi_modal_projector = projector
        self.language_model = language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json (every part inline), model.safetensors and the LM's generation config."""
        path = Path(directory)
        config = {k: v for k, v in self.config.items() if k not in ("audio_model_id", "text_model_id")}
        config["audio_config"] = {**config.get("audio_config", {}), **self._audio_config()}
        config["text_config"] = self.language_model.config.to_dict()
        config["projector_ln_mid"] = not isinstance(self.multi_modal_projector.ln_mid, nn.Identity)
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_model(self, str(path / _WEIGHTS), metadata={"format": "pt"})  # one copy of tied weights
        self.language_model.generation_config.save_pretrained(path)

    def _audio_config(self) -> dict[str, Any]:
        tower = self.audio_tower
        return {
            "model_type": "whisper",
            "d_model": tower.dim,
            "encoder_layers": len(tower.layers),
            "num_mel_bins": tower.num_mels,
            "max_source_positions": tower.embed_positions.num_embeddings,
        }


def load(path: Path, dtype: torch.dtype) -> PretrainedSpeechLM:
    """An Ultravox checkpoint directory (inline parts or parts named by id) as a `PretrainedSpeechLM`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, WhisperConfig, WhisperFeatureExtractor

    from voxtune.model.checkpoint import ModelLoadError, check_keys, resolve
    from voxtune.model.whisper_encoder import build_whisper_encoder, load_whisper_encoder

    config = read_config(path)
    state = _read_weights(path)
    if config.get("audio_model_id") and not any(k.startswith("audio_tower.") for k in state):
        tower = load_whisper_encoder(resolve(config["audio_model_id"]))
    elif "audio_config" in config:
        tower = build_whisper_encoder(WhisperConfig.from_dict(config["audio_config"]))
    else:
        raise ModelLoadError(f"{path / 'config.json'} has neither audio_config nor audio_model_id")
    if config.get("text_model_id") and not any(k.startswith("language_model.") for k in state):
        lm = AutoModelForCausalLM.from_pretrained(resolve(config["text_model_id"]), dtype=torch.float32)
    elif "text_config" in config:
        text = dict(config["text_config"])
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
    else:
        raise ModelLoadError(f"{path / 'config.json'} has neither text_config nor text_model_id")
    hidden = int(config.get("hidden_size", 4096))
    if config.get("projector_act", "swiglu") != "swiglu" or config.get("num_projector_layers", 0):
        raise ModelLoadError(
            f"{path / 'config.json'}: only the SwiGLU projector is read (projector_act swiglu, no projector layers)"
        )
    projector = UltravoxProjector(
        tower.dim,
        hidden,
        lm.config.hidden_size,
        stack=int(config.get("stack_factor", 8)),
        ln_mid=bool(config.get("projector_ln_mid", False)),
    )
    model = UltravoxModel(config, tower, projector, lm)
    expected = model.state_dict()
    tied = {k for k in expected if k.startswith("language_model.") and _tied(lm, k[len("language_model.") :])}
    present = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in state and k not in tied and not _loaded_apart(config, k)]
    check_keys("Ultravox", sorted(missing), sorted(set(state) - set(expected)), [])
    model.load_state_dict(present, strict=False)
    lm.tie_weights()
    model.to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if AUDIO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AUDIO_TOKEN], special_tokens=True)
    if (
        config.get("audio_token_index") is not None
        and tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) != config["audio_token_index"]
    ):
        raise ModelLoadError(
            f"{path}: the tokenizer's {AUDIO_TOKEN} is not audio_token_index {config['audio_token_index']}"
        )
    extractor = WhisperFeatureExtractor.from_pretrained(path)
    return PretrainedSpeechLM(
        architecture="ultravox",
        model=model,
        processor=_Processor(tokenizer, extractor),
        encoder=tower,
        projector=projector,
        lm=lm,
        front_end=FeatureExtractorFrontEnd(extractor, pad_to_max=False, pad_to_hop=True),
        audio_token=AUDIO_TOKEN,
        audio_text=AUDIO_TOKEN,
    )


class _Processor:
    """The tokenizer and feature extractor Ultravox keeps (its own processor is remote code)."""

    def __init__(self, tokenizer: Any, feature_extractor: Any) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.chat_template = None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(directory)
        self.feature_extractor.save_pretrained(directory)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors file(s), by name."""
    from voxtune.model.checkpoint import ModelLoadError

    if (path / _INDEX).is_file():
        files = sorted(set(json.loads((path / _INDEX).read_text())["weight_map"].values()))
    elif (path / _WEIGHTS).is_file():
        files = [_WEIGHTS]
    else:
        raise ModelLoadError(f"{path} has no {_WEIGHTS}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(path / name))
        except (OSError, SafetensorError) as error:
            raise ModelLoadError(f"cannot read {path / name}: {error}") from None
    return state


def _tied(lm: PreTrainedModel, key: str) -> bool:
    """Whether `key` of the LM is the output head sharing the input embeddings' weight."""
    head = lm.get_output_embeddings()
    return (
        bool(getattr(lm.config, "tie_word_embeddings", False))
        and head is not None
        and key == _name_of(lm, head) + ".weight"
    )


def _name_of(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def _loaded_apart(config: dict[str, Any], key: str) -> bool:
    """Whether the part `key` belongs to came from the checkpoint its config names."""
    return (key.startswith("audio_tower.") and bool(config.get("audio_model_id"))) or (
        key.startswith("language_model.") and bool(config.get("text_model_id"))
    )


def tiny(
    directory: str | os.PathLike,
    *,
    hidden: int = 64,
    layers: int = 2,
    encoder_dim: int = 32,
    stack: int = 2,
    ln_mid: bool = True,
    seed: int = 0,
) -> Path:
    """A random Ultravox checkpoint in the Hub layout: a Whisper-shaped encoder (30 s table), a
    Llama LM with a Llama 3 chat template, `<|audio|>` past the LM's vocabulary (as Ultravox adds
    it, without resizing the embeddings)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
    )

    from voxtune.model.architectures.tiny import byte_tokenizer
    from voxtune.model.registry import LLAMA3_TEMPLATE
    from voxtune.model.whisper_encoder import build_whisper_encoder

    torch.manual_seed(seed)
    specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    tokenizer = byte_tokenizer(
        PreTrainedTokenizerFast, {}, specials, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    tokenizer.add_tokens([AUDIO_TOKEN], special_tokens=True)  # id len(vocab): no embedding row
    audio = WhisperConfig(
        num_mel_bins=80,
        d_model=encoder_dim,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=2 * encoder_dim,
        max_source_positions=1500,
    )
    lm = LlamaForCausalLM(text)
    projector = UltravoxProjector(encoder_dim, 4 * hidden, hidden, stack=stack, ln_mid=ln_mid)
    config = {
        "model_type": "ultravox",
        "architectures": ["UltravoxModel"],
        "audio_config": audio.to_dict(),
        "text_config": text.to_dict(),
        "hidden_size": 4 * hidden,
        "stack_factor": stack,
        "projector_act": "swiglu",
        "projector_ln_mid": ln_mid,
        "audio_token_index": tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        "vocab_size": text.vocab_size,
    }
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    UltravoxModel(config, build_whisper_encoder(audio), projector, lm).save_pretrained(path)
    tokenizer.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path
