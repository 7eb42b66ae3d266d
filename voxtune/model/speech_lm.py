"""`SpeechLM`: audio encoder -> projector -> any Hugging Face causal LM.

Audio embeddings are spliced into the LM's input embeddings at the `<|audio|>` positions the
processor laid out, so the LM itself is unchanged and stays a standard checkpoint.

Shape letters: B batch, L sequence, N clips, M mels, T frames, D model width.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast, overload

import numpy as np
import torch
from torch import nn

from voxtune.audio import Audio
from voxtune.audio.features import HOP_LENGTH, log_mel_batch
from voxtune.model.processor import AudioEmbedding, MessageError, SpeechProcessor
from voxtune.model.projector import Projector
from voxtune.model.quantize import merge_to_full_precision
from voxtune.model.registry import Family, family_of
from voxtune.model.whisper_encoder import WhisperEncoder

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedConfig

    from voxtune.model.streaming_encoder import StreamingEncoder

CONFIG_VERSION = 1


class _CausalLM(Protocol):
    """What `SpeechLM` reads off its `lm`: a transformers causal LM, or a peft model around one
    (which forwards these to it)."""

    @property
    def config(self) -> PreTrainedConfig: ...
    def get_input_embeddings(self) -> nn.Module: ...


class _AudioEncoder(Protocol):
    """What `SpeechLM` reads off its `encoder` (or a peft model around it, which forwards it)."""

    def output_lengths(self, mel_frames: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SpeechLMConfig:
    """What, besides the LM checkpoint, rebuilds a `SpeechLM`: the encoder and projector."""

    encoder_kind: str  # "streaming" or "whisper"
    encoder: dict[str, Any]  # the encoder's own config, as a dict
    projector_stack: int
    projector_hidden: int
    n_mels: int
    version: int = CONFIG_VERSION
    # The projector's second RMSNorm between its layers (Ultravox v0.5+, what vLLM and llama.cpp
    # run) rather than after them (v0.4); checkpoints from before the choice have it after.
    projector_norm_mid: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeechLMConfig:
        """Inverse of `to_dict`; unknown keys or a newer version are errors that say so."""
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown keys in the voxtune config: {', '.join(sorted(unknown))}")
        if data.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise ValueError(f"config version {data['version']} is newer than this voxtune reads ({CONFIG_VERSION})")
        return cls(**data)


# The WhisperConfig fields the encoder reads; the rest (decoder, generation) is not saved.
WHISPER_ENCODER_KEYS = (
    "num_mel_bins",
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "activation_function",
    "max_source_positions",
    "scale_embedding",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "encoder_layerdrop",
)


def encoder_config_dict(kind: str, config: Any) -> dict[str, Any]:
    """The JSON-ready config voxtune saves for an encoder of `kind` (a dict or a config object)."""
    data = config if isinstance(config, dict) else config.to_dict()
    if kind == "whisper":
        return {key: data[key] for key in WHISPER_ENCODER_KEYS if key in data}
    from voxtune.model.streaming_encoder import StreamingEncoderConfig

    return StreamingEncoderConfig.from_dict(data).to_dict()  # every field, defaults written out


def build_encoder(kind: str, config: dict[str, Any]) -> StreamingEncoder | WhisperEncoder:
    """The audio encoder of `kind` ("streaming" or "whisper") from its config dict."""
    if kind == "streaming":
        from voxtune.model.streaming_encoder import StreamingEncoderConfig, build_streaming_encoder

        return build_streaming_encoder(StreamingEncoderConfig.from_dict(config))
    if kind == "whisper":
        from transformers import WhisperConfig

        from voxtune.model.whisper_encoder import build_whisper_encoder

        return build_whisper_encoder(WhisperConfig.from_dict(config))
    raise ValueError(f"unknown encoder kind {kind!r} (choose streaming or whisper)")


class SpeechLM(nn.Module):
    """An audio-native language model: `encoder` + `projector` + causal `lm` + its `tokenizer`.

    Build one with `voxtune.model.build_speech_lm` or `voxtune.model.tiny`, or load one with
    `voxtune.load`. This is the interface the engine, the trainer and the server use; other
    architectures' checkpoints fill the same slots (`voxtune.model.architectures`).
    """

    # A new projector learns the LM's input space, so it trains in every method; a pretrained
    # architecture's projector is already fitted and trains only when a recipe asks.
    trains_projector_by_default = True
    # Whether examples can share a row (packing): not when each row cross-attends its own clip.
    supports_packing = True
    # Whether the model was taught voxtune's task tags (answer a spoken request, name the
    # language and style it hears); other architectures answer a clip as it is.
    knows_task_tags = True

    def __init__(
        self, encoder: nn.Module, projector: Projector, lm: nn.Module, tokenizer: Any, config: SpeechLMConfig
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config
        self.processor = self._make_processor()

    def _make_processor(self) -> SpeechProcessor:
        # Any length: a Whisper encoder reads a long clip in 30 s windows (`featurize`).
        return SpeechProcessor(self.tokenizer, self.audio_tokens, self.featurize, end_of_turn=self.family.end_of_turn)

    @property
    def family(self) -> Family:
        """The LM family, from its config's model_type."""
        return family_of(cast(_CausalLM, self.lm).config.model_type)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.parameters()).device

    def audio_tokens(self, samples: int) -> int:
        """LM positions a clip of `samples` 16 kHz samples takes."""
        if self._pads_to_hop:
            frames = sum(self._window_sizes(samples)) // HOP_LENGTH
            hidden = torch.tensor([self._whisper_encoder.window_output_lengths(frames)])
        else:
            hidden = cast(_AudioEncoder, self.encoder).output_lengths(torch.tensor([samples // HOP_LENGTH]))
        return int(self.projector.output_lengths(hidden)[0])

    # ---- audio ------------------------------------------------------------------------------

    @property
    def _pads_to_hop(self) -> bool:
        # A Whisper encoder reads its clips as Whisper's feature extractor gives them in Ultravox
        # and vLLM (zero-padded to a whole hop), so an exported model reads the same frames there.
        return self.config.encoder_kind == "whisper"

    @property
    def _whisper_encoder(self) -> WhisperEncoder:
        # A "whisper" encoder_kind's encoder: a WhisperEncoder, or a peft model around one that
        # forwards its attributes.
        return cast(WhisperEncoder, self.encoder)

    def featurize(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """16 kHz clips -> the encoder's input features [N, M, T] and valid frames [N]: log-mel
        with Whisper's numerics. For a Whisper encoder, each clip is zero-padded to a whole hop
        and cut into 30 s windows, each featurised alone (its own level floor), as Ultravox and
        vLLM featurise long audio; the windows' frames are laid end to end."""
        if not self._pads_to_hop:
            return log_mel_batch(list(clips), self.config.n_mels)
        windows = [self._windows(np.asarray(clip)) for clip in clips]
        features, frames = log_mel_batch([w for clip in windows for w in clip], self.config.n_mels)  # [sum K, M, W]
        if all(len(clip) == 1 for clip in windows):
            return features, frames
        rows, lengths, first = [], [], 0
        for clip in windows:
            pieces = [features[i, :, : frames[i]] for i in range(first, first + len(clip))]
            rows.append(torch.cat(pieces, dim=1).T)  # [T_i, M]: windows end to end
            lengths.append(rows[-1].shape[0])
            first += len(clip)
        padded = nn.utils.rnn.pad_sequence(rows, batch_first=True).transpose(1, 2)  # [N, T, M] -> [N, M, T]
        return padded, torch.tensor(lengths, dtype=torch.int64)

    def _window_sizes(self, samples: int) -> list[int]:
        """Samples in each window `_windows` cuts from a clip of `samples` samples."""
        samples += -samples % HOP_LENGTH
        size = self._whisper_encoder.max_frames * HOP_LENGTH
        full, rest = divmod(samples, size)
        if not full:
            return [samples]
        return [size] * full + ([max(rest, 3 * HOP_LENGTH)] if rest else [])

    def _windows(self, clip: np.ndarray) -> list[np.ndarray]:
        """A clip zero-padded to whole hops and cut into the encoder's windows (30 s for Whisper);
        a last window shorter than 3 hops is zero-padded to 3, the least log-mel reads."""
        starts = np.cumsum([0, *self._window_sizes(len(clip))])
        clip = np.pad(clip, (0, starts[-1] - len(clip)))
        return [clip[start:end] for start, end in zip(starts[:-1], starts[1:], strict=True)]

    def embed_audio(self, features: torch.Tensor, frames: torch.Tensor) -> list[torch.Tensor]:
        """Log-mel `features` [N, M, T] with valid `frames` [N] -> one [n_i, D] tensor per clip."""
        return self.project_audio(*self.encode_features(features, frames))

    def encode_features(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel `features` [N, M, T] with valid `frames` [N] -> encoder outputs [N, T', D_enc]
        and their valid lengths [N]."""
        dtype = next(self.encoder.parameters()).dtype  # features are float32; the model may not be
        # voxtune's Whisper encoder reads a clip past its 30 s table in windows (see `featurize`);
        # with LoRA on it, peft wraps it, and its adapters sit inside the model it wraps.
        base = self.encoder
        if hasattr(base, "get_base_model"):
            base = cast("PeftModel", base).get_base_model()
        encode = base.encode_windows if isinstance(base, WhisperEncoder) else self.encoder
        return encode(features.to(self.device, dtype), frames.to(self.device))

    def project_audio(self, hidden: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs [N, T', D_enc] with valid `lengths` [N] -> one [n_i, D] tensor per clip."""
        tokens = self.projector(hidden)  # [N, ceil(T'/k), D]
        counts = self.projector.output_lengths(lengths)
        return [tokens[i, : int(counts[i])] for i in range(tokens.shape[0])]

    @torch.no_grad()
    def encode_audio(self, audio: Any) -> AudioEmbedding:
        """Encode a clip once (anything `voxtune.audio.load` reads); the result can stand in for
        the audio in later prompts."""
        clip = self.processor.encode_messages([{"role": "user", "content": [{"type": "audio", "audio": audio}]}]).clips[
            0
        ]
        if not isinstance(clip, Audio):  # encoded already
            return clip
        features, frames = self.featurize([clip.samples])
        (embeddings,) = self.embed_audio(features, frames)
        return AudioEmbedding(embeddings.detach(), clip.duration)

    # ---- forward ----------------------------------------------------------------------------

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """Input embeddings [B, L, D] with every clip's audio embeddings at its placeholders."""
        input_ids = batch["input_ids"].to(self.device)
        mask = input_ids == self.processor.audio_token_id  # [B, L]
        # The placeholder may lie past the LM's embedding rows (Ultravox adds it without
        # resizing them); its rows are replaced below, so any id will do.
        embeddings = cast(_CausalLM, self.lm).get_input_embeddings()(input_ids.masked_fill(mask, 0))  # [B, L, D]
        clips = self.batch_clips(batch, embeddings.shape[-1])
        positions = int(mask.sum())
        if not clips:
            if positions:
                raise ValueError(f"{positions} audio positions but no audio in the batch")
            return embeddings
        # [sum n_i, D], in reading order; cached clips may live on another device or dtype.
        audio = torch.cat([clip.to(embeddings.device, embeddings.dtype) for clip in clips])
        if positions != audio.shape[0]:
            raise ValueError(f"{positions} audio positions but {audio.shape[0]} audio embeddings")
        # Row-major boolean indexing matches the processor's reading order of the clips.
        return embeddings.masked_scatter(mask[..., None], audio)

    def prompt_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The LM's inputs for reading prompts at generation, besides the mask, the positions
        and the cache: the embeddings with the audio spliced in."""
        return {"inputs_embeds": self.embed(batch)}

    def step_inputs(self, tokens: torch.Tensor) -> dict[str, Any]:
        """The LM's inputs for one decoding step of `tokens` [B, 1], besides the mask, the
        positions and the cache: their embeddings [B, 1, D]."""
        return {"inputs_embeds": cast(_CausalLM, self.lm).get_input_embeddings()(tokens)}

    def new_cache(self) -> Any:
        """An empty KV cache for generation."""
        from transformers import DynamicCache

        return DynamicCache()

    def batch_clips(self, batch: dict[str, Any], width: int) -> list[torch.Tensor]:
        """Every clip of a collated batch as the LM reads it, [n_i, width] each, in reading order:
        the ones given as features encoded now, the pre-encoded ones as they are."""
        encoded = self.embed_audio(batch["audio_features"], batch["audio_frames"]) if "audio_features" in batch else []
        cached = list(batch.get("audio_embeddings", []))
        flags = batch.get("audio_is_embedding")
        flags = flags.tolist() if flags is not None else [False] * len(encoded) + [True] * len(cached)
        if sum(flags) != len(cached) or len(flags) - sum(flags) != len(encoded):
            raise ValueError("audio_is_embedding does not match the clips in the batch")
        for clip in cached:
            if clip.ndim != 2 or clip.shape[1] != width:
                raise MessageError(f"a pre-encoded clip is {tuple(clip.shape)}; this model needs [tokens, {width}]")
        encoded_clips, cached_clips = iter(encoded), iter(cached)
        return [next(cached_clips) if flag else next(encoded_clips) for flag in flags]

    def lm_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The LM's keyword inputs for a collated (or packed) batch: `inputs_embeds` with the
        audio spliced in, `attention_mask` and `position_ids`; for a packed batch on an LM with
        variable-length attention (`voxtune.model.packed_attention`), the examples' bounds
        instead of the [L, L] mask."""
        from voxtune.model.packed_attention import (
            PACKED_ATTENTION,
            VARLEN_ATTENTION,
            block_causal_mask,
            varlen_inputs,
        )

        embeddings = self.embed(batch)
        positions = batch.get("position_ids")
        positions = positions.to(self.device) if positions is not None else None
        lengths = batch.get("sequence_lengths")
        implementation = self.base_lm().config._attn_implementation
        if lengths is not None and implementation in VARLEN_ATTENTION:
            # Ours reads the bounds and wants an all-ones padding mask (then transformers
            # builds none); flash-attention reads the bounds only when the mask is None.
            ones = torch.ones(embeddings.shape[:2], dtype=torch.long, device=self.device)
            mask = ones if implementation == PACKED_ATTENTION else None
            return {
                "inputs_embeds": embeddings,
                "attention_mask": mask,
                "position_ids": positions,
                **varlen_inputs(lengths, self.device),
            }
        window = getattr(self.base_lm().config, "sliding_window", None)
        if lengths is not None and window is not None and int(lengths.max()) > window:
            # One [L, L] mask serves every layer, so it cannot hold a sliding window.
            raise ValueError(
                f"a packed example of {int(lengths.max())} tokens is longer than the LM's sliding window "
                f"({window}); this needs SDPA attention (packed per example) or unpacked batches"
            )
        if lengths is not None:
            mask = block_causal_mask(lengths, embeddings.dtype, self.device)  # [1, 1, L, L]
        else:
            mask = batch["attention_mask"].to(self.device)
        return {"inputs_embeds": embeddings, "attention_mask": mask, "position_ids": positions}

    def base_lm(self) -> Any:
        """The transformers model, inside a peft wrapper or not."""
        return cast("PeftModel", self.lm).get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    # ---- adapters ---------------------------------------------------------------------------

    def add_adapters(self, lm_targets: Sequence[str], encoder_targets: Sequence[str], **lora: Any) -> None:
        """LoRA adapters (peft, so they are standard) on the LM's linear layers named
        `lm_targets` and the encoder's named `encoder_targets` (either may be empty); `lora`
        holds `peft.LoraConfig` settings (r, lora_alpha, lora_dropout). Only the adapters
        require gradients in the parts that get them."""
        if lm_targets:
            self.lm = _with_lora(self.lm, list(lm_targets), lora)
        if encoder_targets:
            self.encoder = _with_lora(self.encoder, list(encoder_targets), lora)

    @property
    def has_adapters(self) -> bool:
        """Whether LoRA adapters are attached (and not merged)."""
        return any(hasattr(part, "merge_and_unload") for part in (self.lm, self.encoder))

    def save_adapters(self, directory: str | os.PathLike) -> None:
        """Write the adapters alone in peft's format: the LM's in `directory`, the encoder's in
        `directory/encoder`."""
        if hasattr(self.lm, "merge_and_unload"):  # a peft model
            cast("PeftModel", self.lm).save_pretrained(os.fspath(directory))
        if hasattr(self.encoder, "merge_and_unload"):
            cast("PeftModel", self.encoder).save_pretrained(os.path.join(directory, "encoder"))

    def merge_adapters(self) -> None:
        """Fold the adapters into the weights they adapt (the model stays as it computes); a
        4-bit LM (QLoRA) comes back in full precision, its adapters added to the dequantised
        weights."""
        merge_to_full_precision(self.lm)
        if hasattr(self.lm, "merge_and_unload"):  # a peft model
            self.lm = cast("PeftModel", self.lm).merge_and_unload()
        if hasattr(self.encoder, "merge_and_unload"):
            self.encoder = cast("PeftModel", self.encoder).merge_and_unload()

    @contextlib.contextmanager
    def lm_adapters_disabled(self) -> Iterator[Any]:
        """The LM as it was before its adapters (the base model, adapters switched off), for
        the duration of the block."""
        if hasattr(self.lm, "disable_adapter"):  # a peft model
            peft_lm = cast("PeftModel", self.lm)
            with peft_lm.disable_adapter():
                yield peft_lm.get_base_model()
        else:
            yield self.lm

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """(weight [V, D], bias [V] or None, final logit soft-cap or None) of the LM's output
        projection as its forward pass applies it, for losses that project hidden states
        themselves: with peft LoRA adapters on the head, the weight includes their product
        (adapter dropout, which acts on the input, is not applied)."""
        lm = self.base_lm()
        head = lm.get_output_embeddings()
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        if not hasattr(head, "get_delta_weight"):
            return head.weight, head.bias, softcap
        base = head.get_base_layer()
        weight = base.weight
        if not (head.disable_adapters or head.merged):
            for name in head.active_adapters:
                if name in head.lora_A:
                    weight = weight + head.get_delta_weight(name)
        return weight, base.bias, softcap

    def forward(self, batch: dict[str, Any]) -> Any:
        """The LM's output for a collated (or packed) batch; `.loss` is the next-token loss when
        it has labels."""
        labels = batch.get("labels")
        return self.lm(**self.lm_inputs(batch), labels=labels.to(self.device) if labels is not None else None)

    # ---- generation -------------------------------------------------------------------------

    @overload
    def generate(self, messages: Sequence[dict], **sampling: Any) -> str: ...

    @overload
    def generate(self, messages: Sequence[Sequence[dict]], **sampling: Any) -> list[str]: ...

    def generate(self, messages: Sequence[dict] | Sequence[Sequence[dict]], **sampling: Any) -> str | list[str]:
        """Reply to one conversation (returns a string) or to several at once (a list).

        Keyword arguments are `voxtune.model.generation.SamplingParams` fields: max_new_tokens,
        temperature (0 = greedy), top_p, stop, seed.
        """
        from voxtune.model.generation import SamplingParams, generate_batch

        if not messages:
            raise MessageError("no conversation to reply to")
        single = isinstance(messages[0], dict)
        if single:
            conversations = [cast("Sequence[dict]", messages)]
        else:
            conversations = list(cast("Sequence[Sequence[dict]]", messages))
        texts = generate_batch(self, conversations, SamplingParams(**sampling))
        return texts[0] if single else texts

    def stream(self, messages: Sequence[dict], **sampling: Any) -> Iterator[str]:
        """Reply to one conversation, yielding text pieces as they are decoded."""
        from voxtune.model.generation import SamplingParams, stream_one

        return stream_one(self, messages, SamplingParams(**sampling))

    def transcription_messages(self, audio: Any, language: str | None = None) -> list[dict]:
        """The conversation that asks this model for the words spoken in `audio` (optionally in
        a known `language`): voxtune's task tag here; other architectures ask their own way."""
        from voxtune.model.prompts import transcribe_messages

        return transcribe_messages(audio, language)

    def read_transcript(self, reply: str) -> tuple[str, str | None]:
        """(the words, the language the model named or None) of a reply to
        `transcription_messages`; on a partial reply, the words so far."""
        from voxtune.tags import strip_tags, tag_values

        found = tag_values(reply, "lang")
        return strip_tags(reply), found[0] if found else None

    def transcribe(self, audio: Any, language: str | None = None, **sampling: Any) -> str:
        """The words spoken in `audio` (anything `voxtune.audio.load` reads, or an `Audio`),
        without the tags the model writes around them."""
        reply = self.generate(self.transcription_messages(audio, language), **sampling)
        return self.read_transcript(reply)[0]

    def save_pretrained(self, directory: str | os.PathLike, *, extra_files: dict[str, str] | None = None) -> None:
        """Write the model: a standard causal-LM checkpoint plus `voxtune.json` and the audio
        weights (and `extra_files`, name -> text, beside them)."""
        from voxtune.model.checkpoint import save

        save(self, directory, extra_files=extra_files)


def _with_lora(module: nn.Module, targets: list[str] | str, settings: dict[str, Any]) -> nn.Module:
    """`module` inside a peft model with LoRA adapters on the linear layers `targets` names;
    sibling layers that read one input (q/k/v, gate/up) share its down-projection in training
    (`voxtune.model.lora`). In a module with linear layers of another library's own kind (a
    4-bit LM's, for QLoRA), every layer is peft's, which has its own LoRA layer for those."""
    from peft import LoraConfig, get_peft_model

    from voxtune.model.lora import SharedInputLoraLinear, link_siblings

    config = LoraConfig(target_modules=targets, **settings)
    foreign = any(
        isinstance(layer, nn.Linear) and not type(layer).__module__.startswith("torch.") for layer in module.modules()
    )
    if not foreign:
        # peft's documented (experimental) way to give a layer type LoRA layers of one's own.
        config._register_custom_module({nn.Linear: SharedInputLoraLinear})
    with warnings.catch_warnings():
        # peft reads a transformers property that transformers 5 marks deprecated; the
        # warning is about peft's code, not the user's, so it is not shown to them.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = get_peft_model(module, config)
    link_siblings(adapted)
    return adapted
