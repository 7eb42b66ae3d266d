"""The training recipe schema: what model, what data, what trains and how, and where to write.

voxtune train recipes/quickstart.yaml train.max_steps=200 optim.lr=5e-4
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from voxtune.config import Config
from voxtune.data.augment import AugmentConfig
from voxtune.model.tiny import TinyModel


class ModelSection(Config):
    """Where the model comes from: exactly one of `load`, `tiny`, or `lm` with `encoder`."""

    load: str | None = None  # a saved voxtune model directory or Hugging Face repo id
    tiny: TinyModel | None = None
    lm: str | None = None  # a causal-LM checkpoint (directory or repo id) ...
    # ... with a Whisper checkpoint or a streaming-encoder config; or, with tiny (encoder:
    # whisper), a Whisper checkpoint whose pretrained encoder the new tiny LM learns to read.
    encoder: str | dict[str, Any] | None = None
    # With tiny or lm: start the encoder from this saved voxtune model's (same encoder config),
    # e.g. a new LM learning to read an encoder trained before.
    init_encoder: str | None = None
    # With tiny or lm: the new projector's second norm between its layers (the Ultravox v0.5
    # layout vLLM and llama.cpp run) or after them. Default: between, with a Whisper encoder.
    projector_norm_mid: bool | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        sources = [self.load is not None, self.tiny is not None, self.lm is not None]
        if sum(sources) != 1:
            raise ValueError("set exactly one of model.load, model.tiny, or model.lm (with model.encoder)")
        if self.load is not None and self.init_encoder is not None:
            raise ValueError("model.init_encoder goes with model.tiny or model.lm: model.load brings its own encoder")
        if self.load is not None and self.projector_norm_mid is not None:
            raise ValueError(
                "model.projector_norm_mid goes with model.tiny or model.lm: model.load brings its own projector"
            )
        if self.lm is not None and self.encoder is None:
            raise ValueError("model.lm and model.encoder go together")
        if self.tiny is not None and self.encoder is not None:
            if not isinstance(self.encoder, str) or self.tiny.encoder != "whisper":
                raise ValueError(
                    "with model.tiny, model.encoder is a Whisper checkpoint, and model.tiny.encoder is whisper"
                )
            if self.init_encoder is not None:
                raise ValueError("model.encoder and model.init_encoder both give the encoder: set one")
        if self.load is not None and self.encoder is not None:
            raise ValueError("model.encoder goes with model.tiny or model.lm: model.load brings its own encoder")
        return self


class DatasetSource(Config):
    """A Hugging Face dataset saved with `save_to_disk`, with the columns to read (a plain path
    in `data.train` works too when the defaults fit)."""

    dataset: str
    split: str | None = None
    audio_column: str = "audio"
    text_column: str | None = "text"
    columns: dict[str, str] = Field(default_factory=dict)  # field -> column, e.g. {language: lang}


class DataSection(Config):
    """Training and evaluation data, the task mixture and augmentation. Each entry of `train`
    and `valid` is a JSONL manifest, a folder of audio files with `.txt` transcripts beside
    them, a folder a Hugging Face dataset was saved to, or a `DatasetSource`."""

    train: list[str | DatasetSource]
    valid: list[str | DatasetSource] = Field(default_factory=list)
    # A data recipe to synthesise the corpus from when the manifests are not there yet; it is
    # written into the folder of the first train manifest.
    synth: str | None = None
    mixture: dict[str, float] = Field(default_factory=lambda: {"transcribe": 1.0})
    augment: AugmentConfig | None = None


class LoraSection(Config):
    """LoRA adapters (through peft, so they are standard): on the LM's linear layers (the
    family's targets unless given) and, with `encoder`, on the encoder's too."""

    r: int = Field(16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] | None = None
    lm: bool = True  # adapters on the LM (false: the LM stays frozen)
    encoder: bool = False  # adapters on the encoder (its outputs then change: no feature cache)
    encoder_targets: list[str] | None = None  # the encoder's own targets unless given

    @model_validator(mode="after")
    def _somewhere(self) -> LoraSection:
        if not (self.lm or self.encoder):
            raise ValueError("lora: set lm, encoder or both to true")
        return self


class DistillSection(Config):
    """Distillation as Ultravox does it: on examples with a transcript, the speech model's
    next-token distribution over the reply is pulled (KL) towards the text-only LM's given the
    transcript in place of the audio. loss = (1 - weight) * CE + weight * KL."""

    weight: float = Field(0.5, gt=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)


class CtcSection(Config):
    """An auxiliary CTC loss on the encoder's frames against the transcript's tokens (for an
    encoder trained from scratch; voxtune.train.ctc). loss = CE + weight * CTC."""

    weight: float = Field(0.3, gt=0.0)


class TrainSection(Config):
    """What trains, and the schedule."""

    # projector: only the projector trains; qlora: lora on a 4-bit NF4 LM (bitsandbytes)
    method: Literal["full", "lora", "qlora", "projector"] = "lora"
    train_encoder: bool = False  # with full: also update the encoder
    # Whether the projector trains alongside (default: yes for voxtune's own new projector,
    # no for a pretrained architecture's, which is already fitted; projector: always).
    train_projector: bool | None = None
    lora: LoraSection = Field(default_factory=LoraSection)
    distill: DistillSection | None = None
    ctc: CtcSection | None = None  # needs a training encoder (train_encoder, or LoRA on it)
    max_steps: int = Field(100, ge=1)
    max_tokens: int = Field(4096, ge=64)  # per micro-batch (padded or packed)
    max_batch: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    pack: bool = True
    bucket: bool = True  # batches of similar lengths (false: random batches, as a plain sampler makes)
    chunk_tokens: int = Field(1024, ge=1)  # rows per chunk of the chunked cross-entropy
    chunked_loss: bool = True  # false: the LM's own loss over full [tokens, vocab] logits
    # Keep a frozen encoder's outputs on disk (<output>/encoder_cache) so later epochs skip
    # it; it only hits when the audio is the same each epoch, i.e. without augmentation.
    cache_encoder: bool = True
    # Batches prepared ahead by a background thread; None: 2 on a GPU, 0 on the CPU, where the
    # thread competes with the training step for the cores (measured 0.58x there, 2 cores).
    prefetch: int | None = Field(None, ge=0)
    grad_checkpointing: bool = False  # recompute the LM's activations in backward: less memory
    # With several processes: ddp (a replica each), fsdp (sharded, FSDP2), deepspeed (ZeRO), or
    # auto (what an `accelerate launch` config asks for: FSDP or DeepSpeed; else ddp).
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    # deepspeed: ZeRO-2 (gradients and optimizer state split) or ZeRO-3 (weights too); None:
    # the launcher's zero_stage, else 2.
    zero_stage: Literal[2, 3] | None = None
    # fsdp: gather each layer's weights again in backward (ZeRO-3-like, least memory); false
    # keeps them gathered from forward to backward (ZeRO-2-like, less communication).
    fsdp_reshard: bool = True
    # bf16-autocast: the matrix products in bf16, every weight kept in float32. bf16: the
    # LM's frozen weights held in bf16 (half their memory, no cast each step); on the CPU,
    # when all the LM trains are adapters (not on lm_head), it computes in bf16 itself and
    # they, the encoder and the projector in float32, else all under autocast; trained weights
    # and the encoder stay float32, the export is merged in float32.
    precision: Literal["float32", "bf16-autocast", "bf16"] = "float32"
    fused_kernels: bool = True  # Liger Kernel's fused modules, where they run (CUDA, liger-kernel installed)
    # torch.compile each of the LM's decoder layers for training (one process): the first
    # steps pay the compilation, later ones run fused code (measured 1.06x on 2 CPU cores).
    compile: bool = False
    seed: int = 0
    log_every: int = Field(10, ge=1)
    progress: bool = True  # a progress bar on a terminal (the log lines are written either way)

    @model_validator(mode="after")
    def _qlora_has_lm_adapters(self) -> TrainSection:
        if self.method == "qlora" and not self.lora.lm:
            raise ValueError(
                "method qlora puts the LM in 4 bits under its adapters: with lora.lm=false use method lora"
            )
        return self

    @model_validator(mode="after")
    def _compile_without_recompute(self) -> TrainSection:
        if self.compile and self.grad_checkpointing:
            raise ValueError("compile and grad_checkpointing do not go together yet: choose one")
        return self


class OptimSection(Config):
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio` of the peak."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = 1.0


class EvalSection(Config):
    """Evaluation on `data.valid` every `every` steps: the loss, WER/CER of transcription and
    the accuracy of each task, from greedy replies."""

    every: int = Field(50, ge=1)
    limit: int = Field(32, ge=1)  # examples per evaluation
    max_new_tokens: int = Field(64, ge=1)
    tasks: list[str] | None = None  # None: transcription and the mixture's tasks
    at_start: bool = False  # also evaluate before the first step (logged as step 0)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str] | None) -> list[str] | None:
        from voxtune.data.tasks import TASKS

        unknown = [t for t in value or [] if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown} (known: {', '.join(TASKS)})")
        return value


class OutputSection(Config):
    """Where checkpoints, logs and the final model go."""

    dir: str = "out/train"
    save_every: int = Field(50, ge=1)
    keep: int = Field(2, ge=1)  # checkpoints kept (the newest)
    model: str | None = None  # where the trained model goes (default: <dir>/model)


class TrainRecipe(Config):
    """A whole training run."""

    model: ModelSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)
