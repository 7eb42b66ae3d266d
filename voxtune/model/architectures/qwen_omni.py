"""Qwen2.5-Omni and Qwen3-Omni-MoE, the thinker only (`model_type: qwen2_5_omni`,
`qwen3_omni_moe`, or `qwen2_5_omni_thinker` / `qwen3_omni_moe_thinker` for a thinker saved
alone, as voxtune's merged exports are): a Whisper-style audio tower that projects to the LM's
width itself, and a Qwen2 (2.5) or Qwen3-MoE (3) LM. The talker and the codec that turn the
thinker's words into speech are not loaded: voxtune's voice layer speaks.

- Audio: Whisper log-mel, 128 bins. The tower reads each clip's valid frames in chunks of
  2 * n_window frames that attend within themselves (no fixed positional window), so clips
  are not padded for it.
  - Qwen2.5-Omni: its processor pads every clip to the extractor's window (`chunk_length`;
    featurising the padding costs time, the tower reads valid frames only) and counts started
    hops; n = ((frames - 1) // 2 + 1 - 2) // 2 + 1, 25 tokens a second, written
    `<|audio_bos|><|AUDIO|><|audio_eos|>`.
  - Qwen3-Omni: its processor pads to the longest clip only (whole hops: `ClipwiseFrontEnd`);
    three stride-2 convolutions turn each 100-frame chunk into 13 tokens, 12.5 a second,
    written `<|audio_start|><|audio_pad|><|audio_end|>`.
- Positions: TMRoPE gives each token a (t, h, w) position. With no image or video in the
  prompt all three are the token's plain sequential position (the thinkers' `get_rope_index`
  text-only branch; its multimodal branch also advances audio one position per token), and the
  text model expands [B, L] position ids to [3, B, L] itself. So voxtune's [B, L] positions
  (cumsum(mask) - 1) give the thinker's own logits, in the prefill and in the KV-cached decode
  alike (measured: max |difference| 0 on the prompt, and the same greedy tokens): no 3-D
  positions are computed here.
- LoRA: Qwen3-Omni's experts are fused parameters (no linear layers to adapt), so its default
  LM targets are the attention projections only.
- The checkpoint's processor needs torchvision (for its image and video halves); without it,
  its audio half is read from the same files (`OmniAudioProcessor`).

Shape letters: N clips, M mel bins, T frames, T' audio tokens, D width.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from voxtune.audio.features import SAMPLE_RATE
from voxtune.model.architectures.pretrained import (
    FeatureExtractorFrontEnd,
    PretrainedSpeechLM,
    TokenProjector,
    causal_lm_view,
    load_processor,
    load_weights,
    read_config,
)
from voxtune.model.registry import FAMILIES, Family

if TYPE_CHECKING:
    from transformers import (
        PreTrainedConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

logger = logging.getLogger(__name__)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---- audio --------------------------------------------------------------------------------


class ClipwiseFrontEnd(FeatureExtractorFrontEnd):
    """Featurises each clip alone, as the checkpoint's processor does a prompt's one clip when
    it pads to the longest clip (itself) and truncates nothing, then pads the features to the
    batch's longest: a clip's numbers do not depend on the clips beside it, and no window
    limits its length.

    Valid frames are whole hops (with nothing after it, a clip's last partial hop is dropped),
    counted after clips shorter than the extractor's `min_length` samples are zero-padded to it
    (Qwen3-ASR pads to 0.5 s and counts the padding as audio).
    """

    def __init__(self, extractor: Any, **options: Any) -> None:
        super().__init__(extractor, pad_to_max=False, **options)
        self.min_samples = int(getattr(extractor, "min_length", 0) or 0)

    def __call__(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = [self._featurize_one(clip) for clip in clips]
        width = max(features.shape[-1] for features, _ in pieces)
        features = torch.cat([F.pad(f, (0, width - f.shape[-1])) for f, _ in pieces])  # [N, M, T]
        return features, torch.cat([frames for _, frames in pieces])

    def _featurize_one(self, clip: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One clip's features [1, M, T] and valid frames [1]."""
        out = self.extractor(
            [np.asarray(clip, dtype=np.float32)],
            sampling_rate=SAMPLE_RATE,
            return_attention_mask=True,
            padding="longest",
            truncation=False,
            return_tensors="pt",
        )
        features = out[self.features_key].float()
        if self.channels_last:
            features = features.transpose(1, 2)  # [1, T, M] -> [1, M, T]
        return features, out[self.mask_key].sum(-1).long()

    def frames(self, samples: int) -> int:
        """Valid frames of a clip of `samples` samples."""
        return max(samples, self.min_samples) // self.hop


def conv_lengths(frames: torch.Tensor, convolutions: int) -> torch.Tensor:
    """Frames after `convolutions` stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(convolutions):
        frames = (frames - 1) // 2 + 1
    return frames


class OmniAudioEncoder(nn.Module):
    """A Qwen-Omni audio tower as `SpeechLM` calls an encoder: log-mel [N, M, T] with valid
    `frames` [N] -> audio embeddings [N, T', D] (already at the LM's width: the tower ends in
    its own projection, so the projector slot holds the identity) and their counts [N]."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.dim: int = cast("PreTrainedConfig", tower.config).output_dim
        self.max_frames = None  # chunked attention: no positional window to fit

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.arange(features.shape[-1], device=features.device)[None] < frames[:, None]  # [N, T]
        # The tower reads every clip's valid frames end to end: [N, M, T] -> [N, T, M] -> [ΣT, M] -> [M, ΣT].
        joined = features.transpose(1, 2)[valid].T
        hidden = self.tower(joined, feature_lens=frames).last_hidden_state  # [ΣT', D]
        lengths = self.output_lengths(frames)
        return pad_sequence(hidden.split(lengths.tolist()), batch_first=True), lengths  # [N, T', D]


class Qwen25OmniAudioEncoder(OmniAudioEncoder):
    """Qwen2.5-Omni's tower: a stride-2 convolution, then 2x average pooling."""

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """25 tokens a second."""
        return (conv_lengths(frames, 1) - 2) // 2 + 1


class Qwen3OmniAudioEncoder(OmniAudioEncoder):
    """Qwen3-Omni's tower: three stride-2 convolutions over each chunk of 2 * n_window frames."""

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Each whole chunk's tokens (13 for 100 frames: 12.5 a second), then the rest's."""
        chunk = 2 * cast(int, self.tower.n_window)  # the tower's own copy of its config's n_window
        return conv_lengths(frames % chunk, 3) + frames // chunk * int(conv_lengths(torch.tensor(chunk), 3))


# ---- processor ----------------------------------------------------------------------------

# The files of a Qwen-Omni processor besides the tokenizer's.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "video_preprocessor_config.json",
)


class OmniAudioProcessor:
    """The audio half of a Qwen-Omni processor: its tokenizer, Whisper feature extractor and
    chat template, read from the checkpoint's files where the processor itself cannot load (its
    image and video processors need torchvision). `save_pretrained` writes the tokenizer as it
    is now and the other processor files as they were read."""

    def __init__(
        self, tokenizer: Any, feature_extractor: Any, chat_template: str | None, files: dict[str, bytes] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.chat_template = chat_template
        self.files = dict(files or {})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> OmniAudioProcessor:
        """Read the processor files of the checkpoint at `path`.

        Raises:
            ModelLoadError: the feature extractor's or the tokenizer's files are missing.
        """
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        from voxtune.model.checkpoint import ModelLoadError

        path = Path(path)
        if not (path / "preprocessor_config.json").is_file():
            raise ModelLoadError(
                f"{path} has no preprocessor_config.json: the checkpoint is missing its processor files"
            )
        if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            raise ModelLoadError(f"{path} has no tokenizer (tokenizer.json or vocab.json)")
        tokenizer = AutoTokenizer.from_pretrained(path)
        extractor = WhisperFeatureExtractor.from_pretrained(path)
        files = {name: (path / name).read_bytes() for name in PROCESSOR_FILES if (path / name).is_file()}
        return cls(tokenizer, extractor, tokenizer.chat_template or _template_file(path), files)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer, the feature extractor and the template, then the processor files
        as read (they hold more than the audio half: the image and video settings)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.feature_extractor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.chat_template and not (directory / "chat_template.jinja").is_file():
            (directory / "chat_template.jinja").write_text(self.chat_template)
        for name, data in self.files.items():
            (directory / name).write_bytes(data)


def _template_file(path: Path) -> str | None:
    """The chat template a processor keeps beside the tokenizer (chat_template.jinja or .json)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


def load_omni_processor(path: Path) -> Any:
    """The checkpoint's transformers processor, or its audio half (`OmniAudioProcessor`) where
    torchvision, which the processor's image and video halves need, is not installed."""
    if importlib.util.find_spec("torchvision") is not None:
        return load_processor(path)
    logger.info(
        "%s: torchvision is not installed, so the Qwen-Omni processor cannot load; reading its "
        "tokenizer, feature extractor and chat template alone",
        path,
    )
    return OmniAudioProcessor.from_pretrained(path)


# ---- the two generations ------------------------------------------------------------------


@dataclass(frozen=True)
class Thinker:
    """What differs between the Omni generations."""

    model_class: str  # the thinker's transformers class
    encoder_class: type[OmniAudioEncoder]
    lm_type: str  # the standard causal LM whose decoder has the same layers (see `thinker_lm`)
    family: Family
    pads_to_window: bool  # the processor pads every clip to the extractor's window (else to the longest)


_QWEN25 = Thinker(
    "Qwen2_5OmniThinkerForConditionalGeneration", Qwen25OmniAudioEncoder, "qwen2", FAMILIES["qwen2"], True
)
_QWEN3 = Thinker(
    "Qwen3OmniMoeThinkerForConditionalGeneration",
    Qwen3OmniAudioEncoder,
    "qwen3_moe",
    dataclasses.replace(FAMILIES["qwen3"], name="qwen3_moe", lora_targets=ATTENTION),
    False,
)
THINKERS: dict[str, Thinker] = {
    "qwen2_5_omni": _QWEN25,
    "qwen2_5_omni_thinker": _QWEN25,
    "qwen3_omni_moe": _QWEN3,
    "qwen3_omni_moe_thinker": _QWEN3,
}


class OmniSpeechLM(PretrainedSpeechLM):
    """A Qwen-Omni thinker as a `PretrainedSpeechLM`, with the LM family of its generation:
    its text model's own model_type (`qwen3_omni_moe_text`...) is no family voxtune knows, and
    Qwen3-Omni's default LoRA targets must leave out the fused experts."""

    def __init__(self, *, family: Family, **parts: Any) -> None:
        self._family = family  # set first: SpeechLM.__init__ reads it for the end-of-turn token
        super().__init__(**parts)

    @property
    def family(self) -> Family:
        return self._family


def thinker_lm(
    thinker: Qwen2_5OmniThinkerForConditionalGeneration | Qwen3OmniMoeThinkerForConditionalGeneration, lm_type: str
) -> nn.Module:
    """The thinker's text model and head as the standard causal LM of `lm_type` (the same
    modules): transformers has no causal-LM class for the Omni text configs. The view's config
    is the text config's fields under `lm_type`; it describes the LM to voxtune (context length,
    attention implementation), while the text model keeps its own for rotary positions."""
    from transformers import AutoConfig

    # The thinker's config makes a config of a dict: its text config is never a dict or None.
    fields = cast("PreTrainedConfig", thinker.config.text_config).to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    # The view computes no rotary embedding; these keys only make its config warn.
    rope = {k: v for k, v in (fields.get("rope_parameters") or {}).items() if "mrope" not in k and k != "interleaved"}
    fields["rope_parameters"] = rope or None
    return causal_lm_view(AutoConfig.for_model(lm_type, **fields), thinker.model.language_model, thinker.lm_head)


def load(path: Path, dtype: torch.dtype) -> OmniSpeechLM:
    """A Qwen2.5-Omni or Qwen3-Omni checkpoint directory (the full model or its thinker alone)
    as a `PretrainedSpeechLM` of its thinker.

    Raises:
        ModelLoadError: the tokenizer has no audio token, or not the config's.
    """
    import transformers

    from voxtune.model.checkpoint import ModelLoadError

    model_type = read_config(path)["model_type"]
    generation = THINKERS[model_type]
    processor = load_omni_processor(path)
    # The thinker's class reads a full checkpoint's thinker_config and its `thinker.` weights,
    # and leaves the talker's and the codec's.
    model = load_weights(getattr(transformers, generation.model_class), path, dtype)
    tokenizer = processor.tokenizer
    audio_token = getattr(tokenizer, "audio_token", None)
    if audio_token is None or tokenizer.convert_tokens_to_ids(audio_token) != model.config.audio_token_id:
        raise ModelLoadError(f"{path}: the tokenizer's audio token ({audio_token}) is not the config's audio_token_id")
    extractor = processor.feature_extractor
    if generation.pads_to_window:
        front_end = FeatureExtractorFrontEnd(extractor, pad_to_max=True)
    else:
        front_end = ClipwiseFrontEnd(extractor)
    return OmniSpeechLM(
        family=generation.family,
        architecture=model_type,
        model=model,
        processor=processor,
        encoder=generation.encoder_class(model.model.audio_tower),
        projector=TokenProjector(nn.Identity()),
        lm=thinker_lm(model, generation.lm_type),
        front_end=front_end,
        audio_token=tokenizer.audio_token,
        audio_text=f"{tokenizer.audio_bos_token}{tokenizer.audio_token}{tokenizer.audio_eos_token}",
    )


# ---- tiny checkpoints ---------------------------------------------------------------------

# ChatML with the Omni templates' default system turn; `{audio}` is a clip's markers.
_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}{audio}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Each generation's special tokens, as tokenizer attributes.
_TOKENS = {
    "qwen2_5_omni": {
        "audio_token": "<|AUDIO|>",
        "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>",
        "image_token": "<|IMAGE|>",
        "video_token": "<|VIDEO|>",
        "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
    },
    "qwen3_omni_moe": {
        "audio_token": "<|audio_pad|>",
        "audio_bos_token": "<|audio_start|>",
        "audio_eos_token": "<|audio_end|>",
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    },
}


def tiny(
    directory: str | os.PathLike,
    *,
    model_type: str | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    encoder_dim: int = 32,
    encoder_layers: int = 2,
    experts: int = 4,
    seconds: int = 30,
    seed: int = 0,
) -> Path:
    """A random Qwen2.5-Omni or Qwen3-Omni (`model_type`) in the full model's layout (its
    `ForConditionalGeneration` class and config, without the talker, whose weights the thinker
    does not read) with the processor's audio files. `seconds` is the feature extractor's
    window; `experts` Qwen3-Omni's experts per layer.

    Raises:
        ValueError: `model_type` is not one of the two (`tiny_checkpoint` cannot tell them
            apart: both are this module).
    """
    from transformers import Qwen2Tokenizer, WhisperFeatureExtractor

    from voxtune.model.architectures.tiny import CHATML, byte_tokenizer, save_tiny

    if model_type not in _TOKENS:
        raise ValueError(f"pass model_type={' or '.join(_TOKENS)}, got {model_type!r}")
    named = _TOKENS[model_type]
    tokenizer = byte_tokenizer(Qwen2Tokenizer, named, CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    markers = named["audio_bos_token"] + named["audio_token"] + named["audio_eos_token"]
    tokenizer.chat_template = _TEMPLATE.replace("{audio}", markers)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in named.items()}
    sizes = dict(hidden=hidden, layers=layers, heads=heads, encoder_dim=encoder_dim, encoder_layers=encoder_layers)
    if model_type == "qwen2_5_omni":
        model_class, config = _qwen25_config(len(tokenizer), ids, **sizes)
    else:
        model_class, config = _qwen3_config(len(tokenizer), ids, experts=experts, **sizes)
    extractor = WhisperFeatureExtractor(
        feature_size=128, chunk_length=seconds, sampling_rate=16000, return_attention_mask=True
    )
    extractor.processor_class = (  # type: ignore[attr-defined]  # a new attribute: saved, and AutoProcessor reads it
        "Qwen2_5OmniProcessor" if model_type == "qwen2_5_omni" else "Qwen3OmniMoeProcessor"
    )
    processor = OmniAudioProcessor(tokenizer, extractor, tokenizer.chat_template)
    return save_tiny(model_class, config, processor, directory, seed)


def _text(vocab: int, hidden: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    """A tiny thinker text config: head_dim 16, whose 8 rotary frequencies TMRoPE splits
    into its (t, h, w) sections."""
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        **extra,
    }


def _audio(hidden: int, encoder_dim: int, encoder_layers: int, **extra: Any) -> dict[str, Any]:
    """A tiny thinker audio config, projecting to the LM's width."""
    return {
        "d_model": encoder_dim,
        "encoder_layers": encoder_layers,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 2 * encoder_dim,
        "num_mel_bins": 128,
        "output_dim": hidden,
        **extra,
    }


def _qwen25_config(
    vocab: int, ids: dict[str, int], *, hidden: int, layers: int, heads: int, encoder_dim: int, encoder_layers: int
) -> tuple[Any, Any]:
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    thinker = {
        "audio_config": _audio(hidden, encoder_dim, encoder_layers),
        "vision_config": {
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
        },
        "text_config": _text(vocab, hidden, layers, heads, intermediate_size=2 * hidden),
        "audio_token_index": ids["audio_token"],
        "image_token_index": ids["image_token"],
        "video_token_index": ids["video_token"],
        "audio_start_token_id": ids["audio_bos_token"],
        "audio_end_token_id": ids["audio_eos_token"],
        # Read by get_rope_index but not declared by the thinker config (the released one has it).
        "vision_start_token_id": ids["vision_bos_token"],
    }
    return Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)


def _qwen3_config(
    vocab: int,
    ids: dict[str, int],
    *,
    hidden: int,
    layers: int,
    heads: int,
    encoder_dim: int,
    encoder_layers: int,
    experts: int,
) -> tuple[Any, Any]:
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    text = _text(
        vocab,
        hidden,
        layers,
        heads,
        moe_intermediate_size=hidden // 2,
        intermediate_size=2 * hidden,
        num_experts=experts,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    )
    text["rope_parameters"]["mrope_interleaved"] = True
    thinker = {
        "audio_config": _audio(hidden, encoder_dim, encoder_layers, downsample_hidden_size=8, n_window_infer=400),
        "vision_config": {
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "deepstack_visual_indexes": [],
            "num_position_embeddings": 16,
        },
        "text_config": text,
        "audio_token_id": ids["audio_token"],
        "image_token_id": ids["image_token"],
        "video_token_id": ids["video_token"],
        "audio_start_token_id": ids["audio_bos_token"],
        "vision_start_token_id": ids["vision_bos_token"],  # as for Qwen2.5-Omni
    }
    return Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False)
