"""`PretrainedSpeechLM`: another architecture's checkpoint in `SpeechLM`'s slots.

An audio LLM of transformers (Qwen2-Audio, Qwen2.5-Omni...) is an audio tower, a projector and
a language model joined by placeholder tokens, which is voxtune's own shape. Its parts go into
`SpeechLM`'s `encoder`, `projector` and `lm` slots as they are (shared, not copied), so the
engine, the trainer and the server use it unchanged, and the architecture's own class still
holds every weight: LoRA adapters are attached to it (peft, standard names) and it saves the
checkpoint in its own layout, which that class loads back.

Shape letters: N clips, M mel bins, T frames, T' encoder frames, D width.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import numpy as np
import torch
from torch import nn

from voxtune.audio.features import SAMPLE_RATE
from voxtune.errors import InputError
from voxtune.files import atomic_directory
from voxtune.model.processor import SpeechProcessor
from voxtune.model.quantize import merge_to_full_precision
from voxtune.model.speech_lm import SpeechLM, SpeechLMConfig, _with_lora

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from voxtune.model.architectures.ultravox import UltravoxModel
    from voxtune.model.speech_lm import _AudioEncoder

ModelT = TypeVar("ModelT", bound="PreTrainedModel")


class _HeadedLM(Protocol):
    """What `PretrainedSpeechLM` sets on its `lm` (a transformers causal LM, or Whisper's decoder LM)."""

    def set_output_embeddings(self, head: nn.Module) -> None: ...


class FeatureExtractorFrontEnd:
    """Featurises clips with the checkpoint's own feature extractor (the numbers its processor
    gives the model), returning features [N, M, T] and each clip's valid frames [N].

    Args:
        extractor: a transformers feature extractor (Whisper-style: `hop_length`, `n_samples`).
        pad_to_max: pad every clip to the extractor's full window (30 s for Whisper), as
            encoders with a fixed positional table need.
        pad_to_hop: otherwise, pad each clip to whole hops, so a last partial hop is a frame
            (as Ultravox's processor does); without either, it is dropped.
        features_key, mask_key: the names of its outputs.
        channels_last: the extractor returns [N, T, M] (transposed here to [N, M, T]).
    """

    def __init__(
        self,
        extractor: Any,
        *,
        pad_to_max: bool,
        pad_to_hop: bool = False,
        features_key: str = "input_features",
        mask_key: str = "attention_mask",
        channels_last: bool = False,
    ) -> None:
        self.extractor = extractor
        self.pad_to_max = pad_to_max
        self.pad_to_hop = pad_to_hop
        self.features_key = features_key
        self.mask_key = mask_key
        self.channels_last = channels_last
        self.hop = int(extractor.hop_length)
        n_samples = getattr(extractor, "n_samples", None)
        self.max_frames = int(n_samples) // self.hop if pad_to_max and n_samples else None

    def __call__(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.extractor(
            [np.asarray(clip, dtype=np.float32) for clip in clips],
            sampling_rate=SAMPLE_RATE,
            return_attention_mask=True,
            padding="max_length" if self.pad_to_max else "longest",
            return_tensors="pt",
            **({"pad_to_multiple_of": self.hop} if self.pad_to_hop and not self.pad_to_max else {}),
        )
        features = out[self.features_key].float()
        if self.channels_last:
            features = features.transpose(1, 2)  # [N, T, M] -> [N, M, T]
        return features, out[self.mask_key].sum(-1).long()

    def frames(self, samples: int) -> int:
        """Valid frames of a clip of `samples` samples: one per hop, a partial last hop counting
        when clips are padded (to the window or to whole hops), within the window."""
        frames = -(-samples // self.hop) if self.pad_to_max or self.pad_to_hop else samples // self.hop
        return min(frames, self.max_frames) if self.max_frames else frames


class TokenProjector(nn.Module):
    """A projector that maps each encoder frame to one LM embedding (no stacking)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """One audio token per encoder frame."""
        return frames

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` [N, T', D_enc] -> [N, T', D_lm]."""
        return self.module(hidden)


def causal_lm_view(text_config: Any, body: nn.Module, head: nn.Module) -> nn.Module:
    """A standard transformers causal LM for `text_config` made of the given decoder `body`
    and output `head` (the same modules, not copies): what voxtune's generation and losses call.

    Raises:
        ValueError: transformers has no causal-LM class for the config, or the class holds
            more than a body and a head.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # its own weights are replaced at once
        lm = AutoModelForCausalLM.from_config(text_config)
    setattr(lm, lm.base_model_prefix, body)
    lm.set_output_embeddings(head)
    left = [name for name, p in lm.named_parameters() if p.is_meta] + [
        name for name, b in lm.named_buffers() if b.is_meta
    ]
    if left:
        raise ValueError(f"the {type(lm).__name__} view has weights of its own: {', '.join(left[:3])}")
    return lm


class PretrainedSpeechLM(SpeechLM):
    """A speech LM of another architecture, read from its own checkpoint (see the module doc).

    Args:
        architecture: its name in `voxtune.model.architectures.ARCHITECTURES`.
        model: the architecture's transformers model, which holds every weight.
        processor: its transformers processor (tokenizer, feature extractor, chat template).
        encoder: the audio tower, as `SpeechLM` calls it: (features, frames) -> (hidden, lengths),
            with `dim`, `output_lengths` and `max_frames`.
        projector: the audio projector, with `output_lengths`.
        lm: the causal LM that reads the spliced embeddings (e.g. `causal_lm_view`).
        front_end: featurises clips (e.g. `FeatureExtractorFrontEnd`).
        audio_token: the placeholder repeated once per audio position.
        audio_text: how one clip is written in the chat before expansion (the placeholder,
            with the markers the architecture puts around it).
        chat_template: used when the tokenizer has none.
    """

    trains_projector_by_default = False
    knows_task_tags = False
    # Set with object.__setattr__, out of the module tree (see __init__).
    pretrained: PreTrainedModel | UltravoxModel
    _peft: PeftModel | None

    def __init__(
        self,
        *,
        architecture: str,
        model: PreTrainedModel | UltravoxModel,
        processor: Any,
        encoder: nn.Module,
        projector: nn.Module,
        lm: nn.Module,
        front_end: FeatureExtractorFrontEnd,
        audio_token: str,
        audio_text: str,
        chat_template: str | None = None,
    ) -> None:
        self.architecture = architecture
        self.front_end = front_end
        self._audio_token, self._audio_text = audio_token, audio_text
        tokenizer = processor.tokenizer
        if not tokenizer.chat_template:
            tokenizer.chat_template = getattr(processor, "chat_template", None) or chat_template
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked, so any id will do
        audio_config = getattr(model.config, "audio_config", None) or model.config
        config = SpeechLMConfig(
            encoder_kind=architecture,
            encoder=audio_config if isinstance(audio_config, dict) else audio_config.to_dict(),
            projector_stack=1,
            projector_hidden=0,
            n_mels=int(getattr(front_end.extractor, "feature_size", 0)),
        )
        # SpeechLM's annotation says its own Projector; any module with `output_lengths` serves.
        super().__init__(encoder, projector, lm, tokenizer, config)  # type: ignore[arg-type]
        # Kept out of the module tree: its weights are already registered through the slots.
        object.__setattr__(self, "pretrained", model)
        self.hf_processor = processor
        object.__setattr__(self, "_peft", None)  # the peft wrapper of `pretrained`, while adapters are on
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            self.lm.generation_config = generation  # the checkpoint's stop tokens

    def _make_processor(self) -> SpeechProcessor:
        max_frames = self.front_end.max_frames or getattr(self.encoder, "max_frames", None)
        return SpeechProcessor(
            self.tokenizer,
            self.audio_tokens,
            self.featurize,
            max_seconds=max_frames * self.front_end.hop / SAMPLE_RATE if max_frames else None,
            end_of_turn=self.family.end_of_turn,
            audio_token=self._audio_token,
            audio_text=self._audio_text,
        )

    def featurize(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """16 kHz clips -> the checkpoint's own input features [N, M, T] and valid frames [N]."""
        return self.front_end(clips)

    def audio_tokens(self, samples: int) -> int:
        """LM positions a clip of `samples` 16 kHz samples takes."""
        frames = torch.tensor([self.front_end.frames(samples)])
        encoder = cast("_AudioEncoder", self.encoder)
        return int(self.projector.output_lengths(encoder.output_lengths(frames))[0])

    # ---- transcription: in words the checkpoint was trained on, not voxtune's task tags -------

    def transcription_messages(self, audio: Any, language: str | None = None) -> list[dict]:
        """A plain request for the words, as these models' instruction data asks for them."""
        ask = "Transcribe the audio exactly, word for word. Reply with the transcript only."
        if language is not None:
            ask = f"{ask} The language is {language} (ISO 639-1)."
        return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": ask}]}]

    def read_transcript(self, reply: str) -> tuple[str, str | None]:
        return reply.strip(), None

    # ---- adapters: on the architecture's own model, so they carry its module names ----------

    def add_adapters(self, lm_targets: Sequence[str], encoder_targets: Sequence[str], **lora: Any) -> None:
        """LoRA on the LM's and the encoder's linear layers with these (leaf) names, attached to
        the architecture's model under their full names: never a layer of another part."""
        if self._peft is not None:
            raise ValueError("this model has adapters already; merge them first")
        names = self._full_names(self.lm, lm_targets) + self._full_names(self.encoder, encoder_targets)
        head, embeddings = self.pretrained.get_output_embeddings(), self.pretrained.get_input_embeddings()
        if head.weight is embeddings.weight and any(self.pretrained.get_submodule(n) is head for n in names):
            # Merging would write the head's update into the input embeddings too.
            raise InputError(
                "LoRA on the output head: this model ties it to the input embeddings, so merged "
                "adapters would change both; leave the head out of the targets"
            )
        if names:
            object.__setattr__(self, "_peft", _with_lora(self.pretrained, names, lora))
            self._share_head()

    def _share_head(self) -> None:
        """Point the LM view at the model's output head again: peft swaps a targeted layer on
        its parent, and the head's parent is the model, not the view (the layers inside the
        decoder have one parent, shared, and need nothing)."""
        cast(_HeadedLM, self.lm).set_output_embeddings(self.pretrained.get_output_embeddings())

    def _full_names(self, part: nn.Module, targets: Sequence[str]) -> list[str]:
        """The names, in the architecture's model, of `part`'s layers whose own (leaf) name is in
        `targets`. Full names, not leaf names or a pattern: a leaf name alone would also match
        the other parts' layers of that name (the audio tower has q_proj too), and peft rewrites
        patterns for some models."""
        wanted = {id(m) for name, m in part.named_modules() if name.rsplit(".", 1)[-1] in targets}
        return [name for name, m in self.pretrained.named_modules() if id(m) in wanted]

    @property
    def has_adapters(self) -> bool:
        return self._peft is not None

    def save_adapters(self, directory: str | os.PathLike) -> None:
        """Write the adapters in peft's format, named as in the architecture's model: they load
        with the architecture's transformers class and `peft.PeftModel.from_pretrained`."""
        if self._peft is not None:
            self._peft.save_pretrained(os.fspath(directory))  # peft's annotation takes str alone

    def merge_adapters(self) -> None:
        merge_to_full_precision(self.pretrained)
        if self._peft is not None:
            self._peft.merge_and_unload()  # swaps each LoRA layer for its merged base layer, in place
            object.__setattr__(self, "_peft", None)
            self._share_head()

    @contextlib.contextmanager
    def lm_adapters_disabled(self) -> Iterator[Any]:
        if self._peft is None:
            yield self.lm
            return
        with self._peft.disable_adapter():
            yield self.lm

    # ---- saving -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, *, extra_files: dict[str, str] | None = None) -> None:
        """Write the checkpoint in the architecture's own layout (config, weights, processor
        files), atomically, plus `extra_files` (name -> text) beside them."""
        from voxtune.model.checkpoint import ModelLoadError, check_replaceable

        if self._peft is not None:
            raise ModelLoadError("merge the adapters (merge_adapters) or save them alone (save_adapters) first")
        target = check_replaceable(directory)
        with atomic_directory(target) as staging:
            self.pretrained.save_pretrained(staging)
            self.hf_processor.save_pretrained(staging)
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text)


def read_config(path: Path) -> dict[str, Any]:
    """A checkpoint's config.json as a dict (an error that names the file when it is unreadable)."""
    from voxtune.model.checkpoint import ModelLoadError

    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        return json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {config_path}: {error}") from None


def load_processor(path: Path) -> Any:
    """The checkpoint's transformers processor (tokenizer, feature extractor, chat template).

    Raises:
        ModelLoadError: its files are missing (named), or the processor needs a package that
            is not installed, or does not load.
    """
    from transformers import AutoProcessor

    from voxtune.model.checkpoint import ModelLoadError

    if not (path / "preprocessor_config.json").is_file() and not (path / "processor_config.json").is_file():
        raise ModelLoadError(f"{path} has no preprocessor_config.json: the checkpoint is missing its processor files")
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model", "tekken.json")):
        raise ModelLoadError(f"{path} has no tokenizer (tokenizer.json, vocab.json, tokenizer.model or tekken.json)")
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, ImportError, KeyError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load the processor of {path}: {first}") from None


def load_weights(model_class: type[ModelT], path: Path, dtype: torch.dtype) -> ModelT:
    """`model_class.from_pretrained(path)`, every weight present and expected.

    Raises:
        ModelLoadError: weights missing or left over (named), or files that do not load.
    """
    from voxtune.model.checkpoint import check_keys

    # With output_loading_info, from_pretrained returns (model, info), not the model it is annotated to return.
    loaded = model_class.from_pretrained(path, dtype=dtype, output_loading_info=True)
    model, info = cast("tuple[ModelT, dict[str, list[str]]]", loaded)
    check_keys(type(model).__name__, sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", [])), [])
    return model.eval()
