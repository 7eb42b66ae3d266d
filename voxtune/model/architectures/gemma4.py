"""Gemma 4 audio (`model_type: gemma4`): a conformer audio tower, an RMS-normed linear embedder
and the Gemma 4 text model, read from a `Gemma4ForConditionalGeneration` checkpoint.

- Audio: `Gemma4AudioFeatureExtractor` log-mel, 128 bins, 20 ms frames every 10 ms with a
  semicausal half-frame of padding, channels last, at most 30 s (480,000 samples); a frame is
  valid when its whole window is real audio. Two stride-2 convolutions make one token per four
  frames, n = ceil(ceil(frames / 2) / 2), about ceil(ms / 40): 25 tokens per second, at most
  750 per clip. The tower's output mask says which rows are valid (a prefix of each clip).
- A clip is written `<|audio>` + `<|audio|>` x n + `<audio|>` (Gemma4Processor's expansion).
- The text model reads more than embeddings: per-layer embeddings (PLE) looked up by token id,
  which audio positions take from the pad token, as `Gemma4Model` does. `Gemma4SpeechLM` hands
  them to the LM beside `inputs_embeds` at training, prefill and every decoding step. Its other
  parts (embedding scale, sliding-window layers, KV-shared layers, the final logit soft-cap) are
  the text model's and the causal-LM view's own code.
- Turns are `<|turn>role ... <turn|>`: the text config's model_type is `gemma4_text`, a family
  of its own here (`GEMMA4`), whose end of turn is a stop token.
- Vision: a checkpoint with a vision tower loads whole (so exports stay complete checkpoints);
  its vision weights are never read, trained or adapted.
- Processor: `Gemma4Processor` needs a video processor, i.e. torchvision. Without one,
  `Gemma4AudioProcessor` reads the checkpoint's tokenizer and audio feature extractor alone.
"""

from __future__ import annotations

import importlib.util
import json
import logging
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
    read_config,
)
from voxtune.model.registry import Family

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

MAX_SAMPLES = 480_000  # Gemma4AudioFeatureExtractor's max_length (30 s at 16 kHz); it truncates beyond
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")

# Gemma 4's turns; it has a system role. Prefix-consistent, as voxtune's label masking needs.
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
GEMMA4 = Family("gemma4_text", GEMMA4_TEMPLATE, ("<|turn>", "<turn|>"), "<turn|>")


class Gemma4FrontEnd(FeatureExtractorFrontEnd):
    """`Gemma4AudioFeatureExtractor` as voxtune calls a front end: features [N, M, T] (it gives
    them channels last) and each clip's valid frames [N], from its own mask."""

    def __init__(self, extractor: Any) -> None:
        super().__init__(extractor, pad_to_max=False, mask_key="input_features_mask", channels_last=True)
        self.max_frames = MAX_SAMPLES // self.hop  # sets the 30 s limit on clips (longer ones would be cut)

    def frames(self, samples: int) -> int:
        """Valid frames of a clip: windows of frame_length + 1 samples (after frame_length // 2
        samples of left padding) every hop that lie wholly inside the clip."""
        window = int(self.extractor.frame_length)
        samples = min(samples, MAX_SAMPLES)
        return max((samples + window // 2 - (window + 1)) // self.hop + 1, 0)


class Gemma4AudioEncoder(nn.Module):
    """Gemma 4's audio tower as `SpeechLM` calls an encoder: log-mel [N, M, T] with valid
    `frames` [N] -> hidden [N, T/4, D] and valid rows [N] (the tower's own output mask)."""

    # Every linear layer of the conformer blocks (attention q/k/v/post, both feed-forwards and
    # the light convolution's): each is a clipped wrapper around an nn.Linear named `linear`.
    lora_targets = ("linear",)

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.dim: int = cast("PreTrainedConfig", tower.config).output_proj_dims
        self.max_frames = MAX_SAMPLES // 160  # 10 ms hops

    @staticmethod
    def output_lengths(frames: torch.Tensor) -> torch.Tensor:
        """Rows after the two stride-2 (kernel 3, padding 1) convolutions: one audio token each."""
        for _ in range(2):
            frames = (frames - 1) // 2 + 1
        return frames

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = features.shape[-1]
        valid = torch.arange(steps, device=features.device)[None] < frames[:, None]  # [N, T]
        out = self.tower(features.transpose(1, 2), valid)  # the tower reads [N, T, M]
        return out.last_hidden_state, out.attention_mask.sum(-1)  # [N, T/4, D], [N]


class Gemma4SpeechLM(PretrainedSpeechLM):
    """A Gemma 4 checkpoint in `SpeechLM`'s slots (see the module doc): the LM also receives
    its per-layer embeddings, looked up from the token ids."""

    @property
    def family(self) -> Family:
        """Gemma 4's turns, whatever the text config's model_type says (`gemma4_text`)."""
        return GEMMA4

    def per_layer_inputs(self, input_ids: torch.Tensor) -> dict[str, Any]:
        """`per_layer_inputs` [B, L, layers, P] for the token ids [B, L] (none when the text
        model has no per-layer embeddings): audio positions read the pad token's, as in
        `Gemma4Model.forward`, since their ids name no text."""
        decoder = cast("PreTrainedModel", self.lm).get_decoder()  # the LM slot holds a causal_lm_view
        if not decoder.config.hidden_size_per_layer_input:
            return {}
        audio_id = cast(int, self.processor.audio_token_id)  # set: Gemma 4's prompts have an audio token
        text_ids = input_ids.masked_fill(input_ids == audio_id, decoder.config.pad_token_id)
        return {"per_layer_inputs": decoder.get_per_layer_inputs(text_ids)}

    def lm_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {**super().lm_inputs(batch), **self.per_layer_inputs(batch["input_ids"].to(self.device))}

    def prompt_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {**super().prompt_inputs(batch), **self.per_layer_inputs(batch["input_ids"].to(self.device))}

    def step_inputs(self, tokens: torch.Tensor) -> dict[str, Any]:
        return {**super().step_inputs(tokens), **self.per_layer_inputs(tokens)}


class Gemma4AudioProcessor:
    """The part of `Gemma4Processor` voxtune reads, for when that cannot be built (it needs a
    video processor, i.e. torchvision): the checkpoint's tokenizer, its chat template and its
    `Gemma4AudioFeatureExtractor`. `save_pretrained` writes the tokenizer and, unchanged, the
    processor files it was read from (image and video settings included).

    Args:
        tokenizer: the checkpoint's tokenizer, with `audio_token`, `boa_token`, `eoa_token`.
        feature_extractor: its `Gemma4AudioFeatureExtractor`.
        files: processor file name -> text, as read.
    """

    def __init__(self, tokenizer: Any, feature_extractor: Any, files: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.files = files
        self.chat_template = tokenizer.chat_template
        self.audio_token = getattr(tokenizer, "audio_token", None)
        self.boa_token = getattr(tokenizer, "boa_token", None)
        self.eoa_token = getattr(tokenizer, "eoa_token", None)

    @classmethod
    def from_pretrained(cls, path: Path) -> Gemma4AudioProcessor:
        """Read it from a checkpoint directory.

        Raises:
            ModelLoadError: no processor file holds a feature extractor, or the tokenizer does
                not load.
        """
        from transformers import AutoTokenizer, Gemma4AudioFeatureExtractor

        from voxtune.model.checkpoint import ModelLoadError

        files = {name: (path / name).read_text() for name in PROCESSOR_FILES if (path / name).is_file()}
        extractor = Gemma4AudioFeatureExtractor.from_dict(_extractor_config(path, files))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, ImportError, KeyError, TypeError) as error:
            raise ModelLoadError(f"cannot load the tokenizer of {path}: {str(error).strip().splitlines()[0]}") from None
        return cls(tokenizer, extractor, files)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer (and chat template) and the processor files as they were read."""
        self.tokenizer.save_pretrained(directory)
        for name, text in self.files.items():
            (Path(directory) / name).write_text(text)


def _extractor_config(path: Path, files: dict[str, str]) -> dict[str, Any]:
    """The feature extractor's settings: processor_config.json's `feature_extractor` entry
    (transformers 5's layout) or preprocessor_config.json (the older one)."""
    from voxtune.model.checkpoint import ModelLoadError

    for name in PROCESSOR_FILES:
        if name not in files:
            continue
        try:
            data = json.loads(files[name])
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"cannot read {path / name}: {error}") from None
        config = data.get("feature_extractor", data if name == "preprocessor_config.json" else None)
        if isinstance(config, dict) and "feature_size" in config:
            return config
    raise ModelLoadError(
        f"{path} has no audio feature extractor settings (processor_config.json or preprocessor_config.json)"
    )


def _has_video_processor(path: Path) -> bool:
    """Whether the checkpoint's processor files describe a video processor."""
    config = path / "processor_config.json"
    try:
        described = config.is_file() and "video_processor" in json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        described = False
    return described or (path / "video_preprocessor_config.json").is_file()


def load_gemma4_processor(path: Path) -> Any:
    """The checkpoint's `Gemma4Processor`, or, where that cannot be built (no torchvision for
    its video processor, or no video processor files), a `Gemma4AudioProcessor`.

    Raises:
        ModelLoadError: neither loads (the message says why).
    """
    from voxtune.model.checkpoint import ModelLoadError

    try:
        return load_processor(path)
    except ModelLoadError as error:
        if importlib.util.find_spec("torchvision") is not None and _has_video_processor(path):
            raise
        logger.info("%s; reading its tokenizer and audio feature extractor alone", error)
    return Gemma4AudioProcessor.from_pretrained(path)


def load(path: Path, dtype: torch.dtype) -> Gemma4SpeechLM:
    """A Gemma 4 checkpoint directory with an audio tower as a `Gemma4SpeechLM`.

    Raises:
        ModelLoadError: no audio tower, or a tokenizer whose audio tokens are not the config's.
    """
    from transformers import Gemma4ForConditionalGeneration

    from voxtune.model.checkpoint import ModelLoadError

    if read_config(path).get("audio_config") is None:
        raise ModelLoadError(f"{path / 'config.json'} has no audio_config: this Gemma 4 checkpoint reads no audio")
    processor = load_gemma4_processor(path)
    model = load_weights(Gemma4ForConditionalGeneration, path, dtype)
    inner = model.model
    tokens = (processor.boa_token, processor.audio_token, processor.eoa_token)
    audio_id = processor.tokenizer.convert_tokens_to_ids(processor.audio_token) if processor.audio_token else None
    if None in tokens or audio_id != model.config.audio_token_id:
        raise ModelLoadError(
            f"{path}: the tokenizer's audio tokens {tokens} do not match config.json's audio_token_id "
            f"{model.config.audio_token_id}"
        )
    return Gemma4SpeechLM(
        architecture="gemma4",
        model=model,
        processor=processor,
        encoder=Gemma4AudioEncoder(inner.audio_tower),
        projector=TokenProjector(inner.embed_audio),
        lm=causal_lm_view(model.config.text_config, inner.language_model, model.lm_head),
        front_end=Gemma4FrontEnd(processor.feature_extractor),
        audio_token=processor.audio_token,
        audio_text="".join(tokens),
        chat_template=GEMMA4_TEMPLATE,
    )


# ---- tiny random checkpoints ----------------------------------------------------------------

# Named special tokens, as real Gemma 4 tokenizers carry them (tokenizer attributes).
SPECIAL_TOKENS = {
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
}


def gemma_tokenizer() -> Any:
    """A `GemmaTokenizer` with no merges: the special tokens at Gemma's ids (<pad> 0, <eos> 1,
    <bos> 2, <unk> 3, <mask> 4), the named ones (`SPECIAL_TOKENS`) and `<|video|>`, the 256
    byte-fallback tokens, "▁" (space) and the printable ASCII characters: any text tokenises,
    ASCII one token per character, the rest one per UTF-8 byte."""
    from transformers import GemmaTokenizer

    plain = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *SPECIAL_TOKENS.values(), "<|video|>")
    symbols = [*plain, *(f"<0x{byte:02X}>" for byte in range(256)), "▁", *map(chr, range(0x21, 0x7F))]
    vocab = {token: i for i, token in enumerate(symbols)}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], extra_special_tokens=dict(SPECIAL_TOKENS))
    tokenizer.add_tokens(["<|video|>"], special_tokens=True)
    tokenizer.chat_template = GEMMA4_TEMPLATE
    return tokenizer


def tiny_config(
    tokenizer: Any,
    *,
    hidden: int,
    layers: int,
    heads: int,
    encoder_dim: int,
    encoder_layers: int,
    sliding_window: int,
    vision: bool,
) -> Any:
    """A small `Gemma4Config` with every feature of the audio models' text stack: per-layer
    embeddings, sliding and full layers (the full ones with wider heads), KV sharing in the
    second half, double-wide MLPs there, the final logit soft-cap and tied embeddings."""
    from transformers import Gemma4Config

    ids = tokenizer.convert_tokens_to_ids
    vocab = len(tokenizer)
    text = {
        "vocab_size": vocab,
        "vocab_size_per_layer_input": vocab,
        "hidden_size_per_layer_input": 8,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "head_dim": hidden // heads,
        "global_head_dim": 2 * hidden // heads,
        "sliding_window": sliding_window,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
        "num_kv_shared_layers": layers // 2,
        "use_double_wide_mlp": True,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 4096,
        # Wider than the default 0.02: the head (tied to the embeddings) then spreads the logits
        # enough for a few LoRA steps to move them, and greedy replies are not one token over.
        "initializer_range": 0.1,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    # subsampling_conv_channels[0] must be the mel bins (128): the tower reshapes by it.
    audio = {
        "hidden_size": encoder_dim,
        "num_hidden_layers": encoder_layers,
        "num_attention_heads": 2,
        "subsampling_conv_channels": [128, 8],
        "output_proj_dims": 2 * encoder_dim,
        "attention_chunk_size": 4,
        "attention_context_left": 5,
        "attention_context_right": 0,
    }
    vision_config = (
        {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "patch_size": 4,
            "pooling_kernel_size": 2,
            "position_embedding_size": 64,
        }
        if vision
        else None
    )
    return Gemma4Config(
        text_config=text,
        audio_config=audio,
        vision_config=vision_config,
        audio_token_id=ids(SPECIAL_TOKENS["audio_token"]),
        boa_token_id=ids(SPECIAL_TOKENS["boa_token"]),
        eoa_token_index=ids(SPECIAL_TOKENS["eoa_token"]),
        image_token_id=ids(SPECIAL_TOKENS["image_token"]),
        boi_token_id=ids(SPECIAL_TOKENS["boi_token"]),
        eoi_token_id=ids(SPECIAL_TOKENS["eoi_token"]),
        video_token_id=ids("<|video|>"),
    )


def tiny(
    directory: str | os.PathLike,
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    encoder_dim: int = 32,
    encoder_layers: int = 2,
    sliding_window: int = 16,
    vision: bool = False,
    seed: int = 0,
) -> Path:
    """A random Gemma 4 (`Gemma4ForConditionalGeneration`, with a vision tower when `vision`)
    saved as a real checkpoint is: weights, tokenizer with chat template, and a
    processor_config.json naming `Gemma4Processor` with its audio feature extractor (no image
    or video processor settings: those need torchvision to write)."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ForConditionalGeneration

    tokenizer = gemma_tokenizer()
    config = tiny_config(
        tokenizer,
        hidden=hidden,
        layers=layers,
        heads=heads,
        encoder_dim=encoder_dim,
        encoder_layers=encoder_layers,
        sliding_window=sliding_window,
        vision=vision,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = Gemma4ForConditionalGeneration(config).eval()
    # Instruct checkpoints stop at the end of the turn as well as at <eos>.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = Path(directory)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    extractor = json.loads(Gemma4AudioFeatureExtractor().to_json_string())
    processor = {
        "processor_class": "Gemma4Processor",
        "feature_extractor": extractor,
        "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "image_seq_length": 280,
    }
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    return path
