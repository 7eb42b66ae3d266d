"""The training loop: builds the model and data from a recipe, trains, evaluates, checkpoints.

    voxtune train recipes/quickstart.yaml [key=value ...] [--resume]

Checkpoints hold the trainable weights, the optimizer, the schedule, the RNG and the position
in the data, written atomically; `--resume` continues from the newest one and gives the same
loss curve as a run that never stopped (the data order is a function of (seed, epoch), so the
position is all that needs saving).

Several processes when `torchrun` or `accelerate launch` starts it (see
`voxtune.train.distributed`): DDP, FSDP2 with `train.strategy=fsdp` or an accelerate FSDP
config (each decoder layer a shard group; checkpoints gathered to whole tensors), or DeepSpeed
ZeRO-2/3 with `train.strategy=deepspeed` or an accelerate DeepSpeed config (`voxtune.train.zero`):

    torchrun --nproc_per_node 4 -m voxtune.cli train recipes/quickstart.yaml

Every process draws the same batches and trains on every `world`-th one, so a step's global
batch is the union of the processes' micro-batches; the loss is normalised by the step's
trained tokens over all processes, so the update equals the one a single process makes with
`train.grad_accum` times `world` micro-batches. Rank 0 logs, evaluates (under FSDP every
process evaluates, each holding a shard) and writes checkpoints, and
checkpoints move freely between runs with different numbers of processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.nn.parallel import DistributedDataParallel

from voxtune.data.augment import Augmenter
from voxtune.data.dataset import LengthBucketSampler, SpeechDataset, collator
from voxtune.data.example import SpeechExample
from voxtune.data.manifest import ReadResult
from voxtune.data.sources import read_source
from voxtune.eval.tasks import evaluate_tasks
from voxtune.files import WriteError, reported_writes
from voxtune.model import SpeechLM
from voxtune.model.lora import unlink_siblings
from voxtune.model.packed_attention import use_packed_attention
from voxtune.model.processor import Example
from voxtune.train import checkpoints, distributed
from voxtune.train.ctc import alphabet, attach_ctc_head, ctc_loss
from voxtune.train.distill import Distiller
from voxtune.train.feature_cache import EncoderFeatureCache, encoder_fingerprint, with_cached_audio
from voxtune.train.losses import chunked_cross_entropy
from voxtune.train.model_setup import (
    TrainError,
    build_model,
    compile_layers,
    fused_kernels,
    hold_frozen_in_bf16,
    prepare_trainable,
    training_text,
)
from voxtune.train.prefetch import prefetch
from voxtune.train.provenance import TRAINING_RECORD, training_record
from voxtune.train.recipe import DatasetSource, TrainRecipe, TrainSection
from voxtune.train.run_log import RunLog
from voxtune.train.zero import Zero, zero_stage

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel


@dataclass
class TrainState:
    """Where training is: optimizer steps done, and the position in the data."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    seconds: float = 0.0  # wall time spent training so far, over every resumed run


def compute_loss(
    model: SpeechLM,
    batch: dict[str, Any],
    chunk_tokens: int,
    *,
    distiller: Distiller | None = None,
    examples: list[Example] | None = None,
    distill_weight: float = 0.0,
    chunked: bool = True,
    head_rows: int = 1,
) -> tuple[torch.Tensor, int]:
    """Next-token loss over the batch's trained tokens, without the full logits tensor (unless
    `chunked=False`: the LM's own loss over full logits, the plain way); and the number of those
    tokens. With a `distiller`, (1 - distill_weight) * CE + distill_weight * KL to the teacher.
    `head_rows`: the chunked loss scores its rows in multiples of this (zero rows added)."""
    labels = batch["labels"].to(model.device)
    if not chunked:
        output = model.lm(**model.lm_inputs(batch), labels=labels, output_hidden_states=distiller is not None)
        loss, hidden = output.loss, (output.hidden_states[-1] if distiller is not None else None)
    else:
        hidden = model.base_lm().get_decoder()(**model.lm_inputs(batch)).last_hidden_state  # [B, L, D]
        weight, bias, softcap = model.output_head()
        loss = chunked_cross_entropy(
            hidden,
            weight,
            labels,
            chunk_tokens=chunk_tokens,
            lm_head_bias=bias,
            logit_softcap=softcap,
            row_multiple=head_rows,
        )
    if distiller is not None:
        assert hidden is not None  # asked for with a distiller
        kl = distiller.loss(hidden, labels, examples or [])
        if kl is not None:
            loss = (1 - distill_weight) * loss + distill_weight * kl
    return loss, trained_tokens(batch)


# Under bf16 on the CPU, packed rows are made up to a multiple of this many positions, and the
# loss head's scored rows to a multiple of BF16_CPU_HEAD_ROWS: oneDNN, which runs bf16 matmuls
# there, makes and caches a kernel for each new shape (about 0.7 MB each, measured); a few row
# counts hit that cache (and keep it small) instead of growing it every step.
BF16_CPU_ROW_MULTIPLE = 64
BF16_CPU_HEAD_ROWS = 16


def bf16_on_cpu(model: SpeechLM, precision: str) -> bool:
    """Whether `train.precision` puts the matrix products in bf16 on the CPU."""
    return precision != "float32" and model.device.type == "cpu"


def lm_computes_in_bf16(model: SpeechLM, precision: str) -> bool:
    """Whether the LM computes in bf16 itself, without autocast: under `train.precision=bf16`
    on the CPU, when all it trains are LoRA adapters (or nothing). Its frozen weights are bf16
    then, and the float32 adapters compute on a float32 copy of their input (one per group of
    sibling layers, `voxtune.model.lora`) and add their update back in bf16, so their small
    products stay in float32, off oneDNN's bf16 kernels, which it builds and caches for every
    new shape: on the benchmark's small model that took training's own memory from 0.71x to
    0.53-0.58x the baseline's. The float32 copies are kept for backward, though: on the 0.5B
    model, one per layer each (before siblings shared theirs), they cost 485 MiB (0.49x the
    bf16 baseline's peak against 0.42x under autocast; shared, 0.43x). So on a GPU, with no
    per-shape kernels, training stays under autocast, as it does for an LM with other trained
    weights (full fine-tuning) and for adapters on the output head (its merged weight would come
    out float32, at the vocabulary's size). The encoder, projector and a CTC head then run in
    float32 as well."""
    trained = [name for name, parameter in model.lm.named_parameters() if parameter.requires_grad]
    return (
        precision == "bf16"
        and model.device.type == "cpu"
        and all("lora_" in name and "lm_head" not in name for name in trained)
    )


def autocasts(model: SpeechLM, precision: str) -> bool:
    """Whether `train.precision` runs training under bf16 autocast: unless it is float32 or
    the LM computes in bf16 itself (`lm_computes_in_bf16`). Decided once, after the model is
    set up: walking the LM's parameters on every step showed in the benchmark's profile."""
    return precision != "float32" and not lm_computes_in_bf16(model, precision)


def autocast(model: SpeechLM, enabled: bool) -> torch.autocast:
    """bf16 autocast on the model's device, when `enabled` (see `autocasts`)."""
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=enabled)


def trained_tokens(batch: dict[str, Any]) -> int:
    """How many tokens of `batch` the loss is over (known before the forward pass)."""
    return int((batch["labels"][:, 1:] != -100).sum())


class BatchLoss(torch.nn.Module):
    """The training forward as one module: a collated batch -> its mean next-token loss.

    DistributedDataParallel only syncs gradients of weights used inside the `forward` it wraps,
    so everything that touches trainable weights happens here: the projection of cached encoder
    outputs as well as the decoder (`compute_loss` calls the decoder, not `SpeechLM.forward`).
    """

    def __init__(
        self,
        model: SpeechLM,
        cache: EncoderFeatureCache | None,
        train: TrainSection,
        autocasting: bool,
        distiller: Distiller | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.cache = cache
        self.train_section = train
        self.distiller = distiller
        self.head_rows = BF16_CPU_HEAD_ROWS if bf16_on_cpu(model, train.precision) else 1
        self.autocast = autocasting  # `autocasts(model, train.precision)`, decided once by the trainer

    def forward(self, batch: dict[str, Any], examples: list[Example]) -> torch.Tensor:
        train = self.train_section
        if self.cache is not None:
            # In full precision: what goes into the cache must not depend on the recipe's precision.
            batch = with_cached_audio(batch, self.model, examples, self.cache)
        with autocast(self.model, self.autocast):
            auxiliary = None
            if train.ctc is not None:
                batch, auxiliary = self._encode_with_ctc(batch, examples)
            loss, _ = compute_loss(
                self.model,
                batch,
                train.chunk_tokens,
                distiller=self.distiller,
                examples=examples,
                distill_weight=train.distill.weight if train.distill else 0.0,
                chunked=train.chunked_loss,
                head_rows=self.head_rows,
            )
            if auxiliary is not None and train.ctc is not None:  # only the CTC loss gives an auxiliary
                loss = loss + train.ctc.weight * auxiliary
        return loss

    def _encode_with_ctc(
        self, batch: dict[str, Any], examples: list[Example]
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Encode the batch's clips once, for the CTC loss on the encoder's frames and for the
        LM (the batch comes back with the projected clips in place of their features)."""
        flags = batch.get("audio_is_embedding")
        if "audio_features" not in batch or (flags is not None and bool(flags.any())):
            return batch, None  # no clips, or some pre-encoded: the LM path alone
        hidden, lengths = self.model.encode_features(batch["audio_features"], batch["audio_frames"])
        auxiliary = ctc_loss(self.model, hidden, lengths, examples)
        out = {key: value for key, value in batch.items() if key not in ("audio_features", "audio_frames")}
        out["audio_embeddings"] = self.model.project_audio(hidden, lengths)
        out["audio_is_embedding"] = torch.ones(len(out["audio_embeddings"]), dtype=torch.bool)
        return out, auxiliary


def _schedule(recipe: TrainRecipe) -> Callable[[int], float]:
    warmup, total, floor = recipe.optim.warmup_steps, recipe.train.max_steps, recipe.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """One training run of a recipe. `fit()` trains to `train.max_steps`.

    Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) each process makes its own Trainer;
    they join the process group here and leave it when `fit()` ends.
    """

    def __init__(self, recipe: TrainRecipe, *, log: Callable[[str], None] = print) -> None:
        unsupported = distributed.unsupported_launch()
        if unsupported:
            raise TrainError(unsupported)
        self.procs = distributed.start()
        self.recipe = recipe
        self.log = log if self.procs.main else _quiet
        for note in distributed.ignored_launch_settings():
            self.log(note)
        self.out = Path(recipe.output.dir)
        train = recipe.train
        torch.manual_seed(train.seed)
        if self.procs.main:
            self._make_corpus()
        self.procs.barrier()  # the others wait for the corpus
        # Read once: the tokenizer's text, the CTC alphabet and the training set all come from it.
        train_examples = [example for source in recipe.data.train for example in _read(source)]
        tiny = recipe.model.tiny
        self._corpus = training_text(train_examples) if tiny is not None and tiny.tokenizer_corpus == "data" else None
        self.model = build_model(recipe.model, self._corpus).to(self.procs.device)
        self.params = prepare_trainable(self.model, train)
        if train.ctc is not None:
            if not any(p.requires_grad for p in self.model.encoder.parameters()):
                raise TrainError("train.ctc trains the encoder: set train.train_encoder (full) or train.lora.encoder")
            self._ctc_chars = alphabet([e.text for e in train_examples if e.text])
            self.params += list(attach_ctc_head(self.model, self._ctc_chars).parameters())
        self.model.train()
        if self.procs.world > 1:
            # The weights are the same everywhere (and DDP copies rank 0's); dropout should not be.
            torch.manual_seed(train.seed + self.procs.rank)
        if train.grad_checkpointing:
            # Non-reentrant: the inputs are embeddings, not leaves that require grad.
            lm = cast("PreTrainedModel", self.model.lm)  # or peft's wrapper of one, which passes the call on
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.log(f"fused kernels: {fused_kernels(self.model, train)}")
        self.pack = train.pack and self.model.supports_packing
        if train.pack and not self.pack:
            self.log("packing: off (each row of this model cross-attends one clip)")
        if self.pack and use_packed_attention(self.model.base_lm()):
            self.log("attention: per example in packed rows (no [L, L] mask)")
        self.row_multiple = BF16_CPU_ROW_MULTIPLE if self.pack and bf16_on_cpu(self.model, train.precision) else 1
        if self.row_multiple > 1:
            self.log(f"packed rows: made up to a multiple of {self.row_multiple} positions (bf16 on the CPU)")
        self.distiller = (
            Distiller(self.model, temperature=train.distill.temperature, chunk_tokens=train.chunk_tokens)
            if train.distill
            else None
        )
        self.strategy = distributed.choose_strategy(train.strategy, self.procs)
        self.autocast = autocasts(self.model, train.precision)  # what trains is settled by now
        if train.precision == "bf16":
            if self.strategy != "single":
                raise TrainError(f"train.precision=bf16 runs in one process for now, not with {self.strategy}")
            held = hold_frozen_in_bf16(self.model.lm)
            if self.distiller is not None and self.distiller.frozen_copy is not None:
                held += hold_frozen_in_bf16(self.distiller.frozen_copy)
            computes = "under bf16 autocast" if self.autocast else "the LM computes in bf16, its adapters in float32"
            self.log(f"precision: bf16 ({held} frozen LM weights held in bf16; {computes})")
        if train.compile:
            if self.strategy != "single":
                raise TrainError(f"train.compile runs in one process for now, not with {self.strategy}")
            self.log(f"compiled: {compile_layers(self.model)}")
        stage = zero_stage(train.zero_stage) if self.strategy == "deepspeed" else None
        if stage == 3:
            # ZeRO-3 gathers a layer's weights for its own call only: a LoRA layer cannot read
            # its siblings' adapters to share their input's down-projection.
            unlink_siblings(self.model)
        if self.strategy != "single":
            described = f"deepspeed (ZeRO-{stage})" if stage else self.strategy
            self.log(f"{self.procs.world} processes: {described}")
        self.cache = self._encoder_cache(stage)
        self.train_data = self._dataset(
            train_examples,
            recipe.data.train,
            recipe.data.augment,
            distill=train.distill is not None,
            reread=self.cache is not None,  # cached clips are known by their length and digest
        )
        valid = recipe.data.valid
        self.valid_data = self._dataset([e for s in valid for e in _read(s)], valid, None) if valid else None
        self.sampler = LengthBucketSampler(
            self.train_data.token_lengths(),
            max_tokens=train.max_tokens,
            max_batch=train.max_batch,
            window=50 if train.bucket else 1,
            seed=train.seed,
        )
        module = BatchLoss(self.model, self.cache, train, self.autocast, self.distiller)
        self.batch_loss = self._wrap(module)
        if self.strategy == "fsdp":
            self.params = [p for p in self.model.parameters() if p.requires_grad]  # now sharded
        # The fused kernel updates every tensor in one pass (about 10x the default per-tensor
        # loop on a LoRA's many small tensors, on the CPU too); sharded (DTensor) parameters
        # take the multi-tensor one.
        fused = {"foreach": True} if self.strategy == "fsdp" else {"fused": True}
        self.optimizer = torch.optim.AdamW(
            self.params, lr=recipe.optim.lr, betas=recipe.optim.betas, weight_decay=recipe.optim.weight_decay, **fused
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(recipe))
        # DeepSpeed takes the module, optimizer and schedule over: it reduces, clips and steps.
        self.zero: Zero | None = None
        if stage is not None:
            head = self.model.base_lm().get_output_embeddings()
            self.zero = Zero(
                module,
                self.optimizer,
                self.scheduler,
                train,
                recipe.optim,
                stage=stage,
                read_outside_forward=head.parameters(),
            )
            self.batch_loss = self.zero.engine
        self.state = TrainState()
        self._bar: Any = None  # the progress bar, while fit() runs
        self.run_log = RunLog(self.out, self._say)  # written by rank 0 only
        # Called with (batch, examples, epoch) for every micro-batch the loop takes, e.g. to
        # time epochs or count positions (benchmarks/train_throughput.py).
        self.on_batch: Callable[[dict[str, Any], list[Example], int], None] | None = None

    def _encoder_cache(self, zero_stage: int | None) -> EncoderFeatureCache | None:
        train = self.recipe.train
        if not train.cache_encoder or any(p.requires_grad for p in self.model.encoder.parameters()):
            return None
        if zero_stage == 3:
            # ZeRO-3 gathers the encoder's weights from every process for each call: all must
            # encode together, and cache hits differ between their batches.
            self.log("encoder cache off: under ZeRO-3 every process runs the encoder for each batch")
            return None
        if self.recipe.data.augment is not None:
            self.log("encoder cache off: with augmentation every epoch hears different audio")
            return None
        fingerprint = encoder_fingerprint(self.model.encoder, config=self.model.config.encoder)
        return EncoderFeatureCache(self.out / "encoder_cache", fingerprint)

    def _make_corpus(self) -> None:
        """Synthesise the corpus of `data.synth` when its manifests are not there yet."""
        data = self.recipe.data
        paths = [p for p in data.train + data.valid if isinstance(p, str)]
        if data.synth is None or all(Path(p).exists() for p in paths):
            return
        if not isinstance(data.train[0], str):
            raise TrainError("data.synth writes manifests: the first entry of data.train must be the manifest path")
        from voxtune.data.synth import make_missing_corpus  # the voices load only when a corpus is made

        make_missing_corpus(data.synth, paths, log=self.log)

    def _dataset(
        self,
        examples: list[SpeechExample],
        sources: list[str | DatasetSource],
        augment: Any,
        *,
        distill: bool = False,
        reread: bool = False,
    ) -> SpeechDataset:
        """A `SpeechDataset` of `examples` (read from `sources`, named when they hold none)."""
        if not examples:
            raise TrainError(f"no examples in {', '.join(s if isinstance(s, str) else s.dataset for s in sources)}")
        augmenter = Augmenter(augment) if augment is not None else None
        # A copy of the processor: batches are made in a background thread, and a fast
        # tokenizer must not be used by two threads at once (evaluation tokenises meanwhile).
        processor = copy.copy(self.model.processor)
        processor.tokenizer = copy.deepcopy(processor.tokenizer)
        return SpeechDataset(
            examples,
            processor,
            self.recipe.data.mixture,
            augmenter=augmenter,
            seed=self.recipe.train.seed,
            distill=distill,
            reread=reread,
        )

    # ---- data ---------------------------------------------------------------------------------

    def _stream(self, epoch: int, start: int) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, position after it, example indices) of every batch from batch `start` of
        `epoch` on, epoch after epoch: the same on every process."""
        while True:
            self.sampler.set_epoch(epoch)
            batches = self.sampler.batches()
            for position in range(start, len(batches)):
                yield epoch, position + 1, batches[position]
            epoch, start = epoch + 1, 0

    def _batches(self) -> Generator[tuple[dict[str, Any], list[Example], tuple[int, int]], None, None]:
        """This process's micro-batches from the current position on: (collated batch, its
        examples, the data position after it). Of every `world` batches drawn, the one at this
        process's rank; one process takes them all. Made ahead in a background thread when
        `train.prefetch` says so; `self.state` is only moved by the loop, as it consumes them."""
        # With the cache, the clips' encoder outputs come from it: no log-mel needed here.
        collate = collator(
            self.train_data.processor, pack=self.pack, features=self.cache is None, row_multiple=self.row_multiple
        )
        stream = self._stream(self.state.epoch, self.state.batch_in_epoch)

        def make() -> Iterator[tuple[dict[str, Any], list[Example], tuple[int, int]]]:
            while True:
                drawn = [next(stream) for _ in range(self.procs.world)]
                epoch, _, indices = drawn[self.procs.rank]
                self.train_data.set_epoch(epoch)
                examples = [self.train_data[i] for i in indices]
                yield collate(examples), examples, drawn[-1][:2]

        depth = self.recipe.train.prefetch
        if depth is None:
            depth = 2 if self.model.device.type == "cuda" else 0
        return prefetch(make(), depth)

    # ---- loop ---------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train to `train.max_steps`, or stop (with a checkpoint) once `stop_after` steps are
        done, to go on later with `resume`; returns the last logged record."""
        if self.procs.world > 1 and not self.procs.active:  # a second fit: join again
            self.procs = distributed.start()
        try:
            return self._fit(resume, stop_after)
        finally:
            self.run_log.close()
            self.procs.close()

    def _fit(self, resume: bool, stop_after: int | None) -> dict[str, Any]:
        if resume:
            self._resume()
        train, started = self.recipe.train, time.perf_counter()
        batch_loss = self.batch_loss
        batches = self._batches()
        record: dict[str, Any] = {}
        tokens = audio_seconds = 0.0
        first_step, seconds_before = self.state.step, self.state.seconds
        if first_step == 0 and self.recipe.eval.at_start and self.valid_data is not None:
            self._evaluate_and_log()  # step 0: where the model starts from
        self._bar = self._progress_bar()
        try:
            while self.state.step < train.max_steps:
                if self.zero is None:  # DeepSpeed clears its own after each update
                    self.optimizer.zero_grad(set_to_none=True)
                micro = [next(batches) for _ in range(train.grad_accum)]
                for batch, examples, (epoch, _) in micro:
                    if self.on_batch is not None:
                        self.on_batch(batch, examples, epoch)
                counts = [trained_tokens(batch) for batch, _, _ in micro]
                seconds = sum(clip.duration for batch, _, _ in micro for clip in batch["clips"])
                total, seconds = self.procs.all_sum([sum(counts), seconds])
                loss_sum = 0.0
                for i, ((batch, examples, _), count) in enumerate(zip(micro, counts, strict=True)):
                    # This micro-batch's share of the mean over all the step's tokens (all
                    # processes); DDP averages the processes' gradients, hence `world`.
                    weight = count * self.procs.world / max(1.0, total)
                    loss_sum += self._backward(batch_loss, batch, examples, weight, sync=i == len(micro) - 1) * count
                (loss_sum,) = self.procs.all_sum([loss_sum])
                tokens, audio_seconds = tokens + total, audio_seconds + seconds
                grad_norm = self._update()
                self.state.step += 1
                self.state.epoch, self.state.batch_in_epoch = micro[-1][2]
                elapsed = time.perf_counter() - started
                self.state.seconds = seconds_before + elapsed
                record = {
                    "step": self.state.step,
                    "loss": loss_sum / max(1.0, total),
                    "grad_norm": grad_norm,
                    "lr": self.scheduler.get_last_lr()[0],
                    "epoch": self.state.epoch,
                    "tokens_per_s": tokens / elapsed,
                    "audio_s_per_s": audio_seconds / elapsed,
                }
                self._log(record, every=train.log_every)
                if self._bar is not None:
                    self._bar.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                        audio_s_s=f"{record['audio_s_per_s']:.1f}",
                        refresh=False,
                    )
                    self._bar.update(1)
                if self.valid_data is not None and self.state.step % self.recipe.eval.every == 0:
                    self._evaluate_and_log()
                stopping = stop_after is not None and self.state.step >= stop_after
                if (
                    self.state.step % self.recipe.output.save_every == 0
                    or self.state.step == train.max_steps
                    or stopping
                ):
                    self.save_checkpoint()
                if stopping:
                    break
        finally:
            batches.close()  # stops the prefetching thread
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if self.state.step > first_step:
            self._say(f"trained steps {first_step + 1}-{self.state.step} in {time.perf_counter() - started:.1f} s")
        return record

    def _update(self) -> float:
        """Clip the step's gradients, update the weights and the schedule; returns the gradient
        norm before clipping (the same on every process): logged, since it shows how hard
        clipping works, and it checks that the gradients are scaled right. DeepSpeed has
        already done all this in the last micro-batch's backward."""
        if self.zero is not None:
            return self.zero.grad_norm()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.recipe.optim.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the same on every process
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        return float(grad_norm)

    def _progress_bar(self) -> Any:
        """A tqdm bar over the steps (loss, tokens/s, audio seconds/s, ETA) when rank 0 writes
        to a terminal and `train.progress` is on; None otherwise."""
        if not (self.procs.main and self.recipe.train.progress):
            return None
        from tqdm import tqdm

        bar = tqdm(
            total=self.recipe.train.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True, disable=None
        )
        return None if bar.disable else bar

    def _say(self, line: str) -> None:
        """Log a line without tearing the progress bar."""
        if self._bar is None:
            self.log(line)
            return
        from tqdm import tqdm

        with tqdm.external_write_mode():
            self.log(line)

    def _wrap(self, module: BatchLoss) -> torch.nn.Module:
        """The module the loop calls: `module` itself with one process (or for DeepSpeed to
        take), inside DDP, or sharded with FSDP2 (each decoder layer its own group, the rest one
        group at the root)."""
        if self.strategy in ("single", "deepspeed"):
            return module
        if self.strategy == "ddp":
            # No device_ids: the model moves its inputs itself, and the batch holds more than tensors.
            return DistributedDataParallel(module, find_unused_parameters=False)
        from torch.distributed.fsdp import fully_shard

        layers = getattr(self.model.base_lm().get_decoder(), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise TrainError("train.strategy=fsdp: this LM has no list of decoder layers to shard")
        for layer in layers:
            fully_shard(layer, reshard_after_forward=self.recipe.train.fsdp_reshard)
        fully_shard(module)
        return module

    def _backward(
        self, batch_loss: torch.nn.Module, batch: dict[str, Any], examples: list[Example], weight: float, *, sync: bool
    ) -> float:
        """Forward and backward of one micro-batch, its loss scaled by `weight`; gradients are
        synced between processes only when `sync` (the step's last micro-batch). Returns the
        unscaled loss."""
        if self.zero is not None:  # DeepSpeed syncs at the step's last micro-batch itself
            loss = batch_loss(batch, examples)
            self.zero.backward(loss * weight)
            return loss.detach().item()
        if self.strategy == "fsdp":
            cast("FSDPModule", batch_loss).set_requires_gradient_sync(sync)
        accumulating = batch_loss if not sync and isinstance(batch_loss, DistributedDataParallel) else None
        with accumulating.no_sync() if accumulating is not None else contextlib.nullcontext():
            loss = batch_loss(batch, examples)
            (loss * weight).backward()
        return loss.detach().item()

    def _log(self, record: dict[str, Any], *, every: int) -> None:
        if self.procs.main:
            self.run_log.write(record, every=every)

    def _evaluate_and_log(self) -> None:
        """Evaluate on rank 0 while the other processes wait; with FSDP or ZeRO-3 every process
        runs the same evaluation (each holds only a shard of the weights) and rank 0 logs it."""
        sharded = self.strategy == "fsdp" or (self.zero is not None and self.zero.stage == 3)
        if self.procs.main or sharded:
            with self._root_unsharded():
                result = self.evaluate()
            if self.procs.main:
                self._log({"step": self.state.step, **result}, every=1)
        self.procs.barrier()

    @contextlib.contextmanager
    def _root_unsharded(self) -> Iterator[None]:
        """Under FSDP, the weights outside the decoder layers (embeddings, head, encoder,
        projector) gathered for calls that do not go through the sharded root's forward (the
        layers gather their own); under ZeRO-3, every weight; nothing otherwise."""
        if self.zero is not None:
            with self.zero.gathered(self.model.parameters()):
                yield
            return
        if self.strategy != "fsdp":
            yield
            return
        root = cast("FSDPModule", self.batch_loss)
        root.unshard()
        try:
            yield
        finally:
            root.reshard()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """On the first `eval.limit` validation examples: the loss, and every evaluated task
        asked with greedy decoding (WER/CER of transcription, `acc_<task>` for each task; see
        `voxtune.eval.tasks.evaluate_tasks`)."""
        model, limit, valid = self.model, self.recipe.eval.limit, self.valid_data
        if valid is None:
            raise TrainError("evaluation needs validation data: set data.valid in the recipe")
        was_training = model.training
        model.eval()
        # Compiled layers (train.compile) were compiled for training's shapes; generation's
        # one-token steps with a cache would only make them compile again.
        stance = torch.compiler.set_stance("force_eager") if self.recipe.train.compile else contextlib.nullcontext()
        try:
            # In the precision training runs in, so that the two losses compare.
            with stance, autocast(model, self.autocast):
                count = min(limit, len(valid))
                losses = [
                    compute_loss(model, model.processor.collate([valid[i]]), self.recipe.train.chunk_tokens)
                    for i in range(count)
                ]
                result = {"eval_loss": sum(float(loss) * n for loss, n in losses) / max(1, sum(n for _, n in losses))}
                result.update(
                    evaluate_tasks(
                        model,
                        valid.examples[:count],
                        self.eval_tasks,
                        max_new_tokens=self.recipe.eval.max_new_tokens,
                    )
                )
        finally:
            model.train(was_training)
        return result

    @property
    def eval_tasks(self) -> list[str]:
        """The tasks evaluation asks: `eval.tasks`, or the mixture's and transcription."""
        if self.recipe.eval.tasks is not None:
            return list(self.recipe.eval.tasks)
        return ["transcribe", *(t for t, w in self.recipe.data.mixture.items() if w > 0 and t != "transcribe")]

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the trainable weights, optimizer, schedule, RNG and data position atomically
        (`voxtune.train.checkpoints`); every process returns once the checkpoint is there."""
        return checkpoints.save(
            self.out,
            asdict(self.state),
            self.model,
            self.optimizer,
            self.scheduler,
            self.procs,
            self.recipe.output.keep,
            self.zero,
        )

    def _resume(self) -> None:
        latest = checkpoints.latest(self.out)
        self.state = TrainState(
            **checkpoints.restore(latest, self.model, self.optimizer, self.scheduler, self.procs, self.zero)
        )
        if self.procs.main:
            # What a killed run left past the checkpoint: log records of steps that will run
            # again, and half-written checkpoint folders.
            self.run_log.forget_after(self.state.step)
            checkpoints.clear_staging(self.out)
        self.log(f"resumed from {latest} (step {self.state.step})")

    def export(self) -> Path:
        """Write the trained model to `output.model` (default `<output>/model`; LoRA merged in)
        with `training.json` (how it was made: the recipe, the data recipe, the seed, the
        voxtune version, steps, training time and the last evaluation) and, for LoRA, the
        adapters alone (standard peft format): the LM's in `<output>/adapter`, the encoder's in
        `<output>/adapter/encoder`. Rank 0 writes; the other processes only return the path.

        Under FSDP and DeepSpeed rank 0 may hold a shard only, and with `train.precision=bf16`
        the LM's frozen weights are held in bf16: then it builds the model again, unsharded and
        in full precision, and loads the last checkpoint's trained weights into it (`fit` always
        ends with a checkpoint).
        """
        target = Path(self.recipe.output.model) if self.recipe.output.model else self.out / "model"
        if not self.procs.main:
            return target
        model = self.model
        # Rebuilt unsharded, or in full precision (the LM's frozen weights were held in bf16).
        if self.strategy in ("fsdp", "deepspeed") or self.recipe.train.precision == "bf16":
            model = build_model(self.recipe.model, self._corpus)
            prepare_trainable(model, self.recipe.train)
            if self.recipe.train.ctc is not None:  # its trained head is in the checkpoint (not in the export)
                attach_ctc_head(model, self._ctc_chars)
            trained = {name for name, p in model.named_parameters() if p.requires_grad}
            weights = checkpoints.trained_weights(checkpoints.latest(self.out), model)
            if trained - set(weights):
                raise TrainError("the last checkpoint lacks trained weights of this recipe's model")
            model.load_state_dict(weights, strict=False)
        evaluations = [r for r in self.run_log.records() if "eval_loss" in r]
        record = training_record(
            self.recipe, steps=self.state.step, seconds=self.state.seconds, evaluations=evaluations
        )
        provenance = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
        try:
            if model.has_adapters:
                with reported_writes(f"the adapters to {self.out / 'adapter'}"):
                    model.save_adapters(self.out / "adapter")
                model.merge_adapters()
            model.eval()
            with reported_writes(f"the trained model to {target}"):
                model.save_pretrained(target, extra_files={TRAINING_RECORD: provenance})
        except WriteError as error:
            raise TrainError(
                f"{error} (the last checkpoint is whole: make room, then --resume exports again)"
            ) from None
        return target


def _read(source: str | DatasetSource) -> ReadResult:
    """The examples of one entry of `data.train` / `data.valid`."""
    if isinstance(source, str):
        return read_source(source)
    return read_source(
        source.dataset,
        split=source.split,
        audio_column=source.audio_column,
        text_column=source.text_column,
        columns=source.columns or None,
    )


def _quiet(message: str) -> None:
    """The log of processes other than rank 0."""
