"""The training loop: builds the model and data from a recipe, trains, evaluates, checkpoints.

    voxtune train recipes/quickstart.yaml [key=value ...] [--resume]

Checkpoints hold the trainable weights, the optimizer, the schedule, the RNG and the position
in the data, written atomically; `--resume` continues from the newest one and gives the same
loss curve as a run that never stopped (the data order is a function of (seed, epoch), so the
position is all that needs saving).

Several processes (DDP) when `torchrun` or `accelerate launch` starts it (see
`voxtune.train.distributed`):

    torchrun --nproc_per_node 4 -m voxtune.cli train recipes/quickstart.yaml

Every process draws the same batches and trains on every `world`-th one, so a step's global
batch is the union of the processes' micro-batches; the loss is normalised by the step's
trained tokens over all processes, so the update equals the one a single process makes with
`train.grad_accum` times `world` micro-batches. Rank 0 logs, evaluates and checkpoints, and
checkpoints move freely between runs with different numbers of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from voxtune.data.augment import Augmenter
from voxtune.data.dataset import LengthBucketSampler, SpeechDataset, collator
from voxtune.data.manifest import read_manifest
from voxtune.errors import InputError
from voxtune.files import atomic_directory, write_atomic
from voxtune.model import SpeechLM
from voxtune.model.processor import Example
from voxtune.train import distributed
from voxtune.train.feature_cache import EncoderFeatureCache, encoder_fingerprint, with_cached_audio
from voxtune.train.losses import chunked_cross_entropy
from voxtune.train.recipe import ModelSection, TrainRecipe, TrainSection

CHECKPOINTS = "checkpoints"
LOG_FILE = "log.jsonl"
TENSORBOARD = "tensorboard"  # event files: tensorboard --logdir <output>/tensorboard


class TrainError(InputError):
    """A recipe that cannot run as written (bad data, an impossible method for the model)."""


@dataclass
class TrainState:
    """Where training is: optimizer steps done, and the position in the data."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed


def build_model(section: ModelSection) -> SpeechLM:
    """The model a recipe names: loaded, built tiny, or composed from pretrained parts."""
    from voxtune.model import compose, load, tiny

    if section.load is not None:
        return load(section.load)
    if section.tiny is not None:
        t = section.tiny
        return tiny(t.lm, t.encoder, hidden=t.hidden, layers=t.layers)
    return compose(section.lm, section.encoder)


def prepare_trainable(model: SpeechLM, train: TrainSection) -> list[torch.nn.Parameter]:
    """Freeze and wrap `model` for `train.method`; returns the parameters that train.

    full: everything but the encoder (unless `train_encoder`); lora: LoRA adapters on the LM
    (through peft, so adapters are standard) plus the projector; projector: the projector only.
    """
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if train.method == "full":
        model.lm.requires_grad_(True)
        model.encoder.requires_grad_(train.train_encoder)
    elif train.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = train.lora.targets or list(model.family.lora_targets)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.lm.named_modules()}
        missing = sorted(set(targets) - present)
        if missing:
            raise TrainError(f"train.lora.targets: the LM has no modules named {', '.join(missing)}")
        config = LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout, target_modules=targets)
        with warnings.catch_warnings():
            # peft reads a transformers property that transformers 5 marks deprecated; the
            # warning is about peft's code, not the user's, so it is not shown to them.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model.lm = get_peft_model(model.lm, config)
    return [p for p in model.parameters() if p.requires_grad]


def _lm_parts(model: SpeechLM) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """(decoder without its head, the output head, the final logit soft-cap if any)."""
    lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
    return lm.get_decoder(), lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)


def compute_loss(model: SpeechLM, batch: dict[str, Any], chunk_tokens: int) -> tuple[torch.Tensor, int]:
    """Next-token loss over the batch's trained tokens, without the full logits tensor; and
    the number of those tokens."""
    decoder, head, softcap = _lm_parts(model)
    hidden = decoder(**model.lm_inputs(batch)).last_hidden_state  # [B, L, D]
    labels = batch["labels"].to(model.device)
    loss = chunked_cross_entropy(
        hidden, head.weight, labels, chunk_tokens=chunk_tokens, lm_head_bias=head.bias, logit_softcap=softcap
    )
    return loss, trained_tokens(batch)


def trained_tokens(batch: dict[str, Any]) -> int:
    """How many tokens of `batch` the loss is over (known before the forward pass)."""
    return int((batch["labels"][:, 1:] != -100).sum())


class BatchLoss(torch.nn.Module):
    """The training forward as one module: a collated batch -> its mean next-token loss.

    DistributedDataParallel only syncs gradients of weights used inside the `forward` it wraps,
    so everything that touches trainable weights happens here: the projection of cached encoder
    outputs as well as the decoder (`compute_loss` calls the decoder, not `SpeechLM.forward`).
    """

    def __init__(self, model: SpeechLM, cache: EncoderFeatureCache | None, chunk_tokens: int, *, bf16: bool = False) -> None:
        super().__init__()
        self.model = model
        self.cache = cache
        self.chunk_tokens = chunk_tokens
        self.bf16 = bf16

    def forward(self, batch: dict[str, Any], examples: list[Example]) -> torch.Tensor:
        if self.cache is not None:
            # In full precision: what goes into the cache must not depend on the recipe's precision.
            batch = with_cached_audio(batch, self.model, examples, self.cache)
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = compute_loss(self.model, batch, self.chunk_tokens)
        return loss


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
        torch.manual_seed(recipe.train.seed)
        self.model = build_model(recipe.model)
        self.params = prepare_trainable(self.model, recipe.train)
        self.model.to(self.procs.device)
        self.model.train()
        if self.procs.world > 1:
            # The weights are the same everywhere (and DDP copies rank 0's); dropout should not be.
            torch.manual_seed(recipe.train.seed + self.procs.rank)
        if recipe.train.grad_checkpointing:
            # Non-reentrant: the inputs are embeddings, not leaves that require grad.
            self.model.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.cache = self._encoder_cache()
        if self.procs.main:
            self._make_corpus()
        self.procs.barrier()  # the others wait for the corpus
        self.train_data = self._dataset(recipe.data.train, recipe.data.augment)
        self.valid_data = self._dataset(recipe.data.valid, None) if recipe.data.valid else None
        self.sampler = LengthBucketSampler(
            self.train_data.token_lengths(), max_tokens=recipe.train.max_tokens, max_batch=recipe.train.max_batch, seed=recipe.train.seed
        )  # fmt: skip
        self.optimizer = torch.optim.AdamW(
            self.params, lr=recipe.optim.lr, betas=recipe.optim.betas, weight_decay=recipe.optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(recipe))
        self.state = TrainState()
        self._board: Any = None  # the TensorBoard writer, opened with the first record

    def _encoder_cache(self) -> EncoderFeatureCache | None:
        train = self.recipe.train
        if not train.cache_encoder or any(p.requires_grad for p in self.model.encoder.parameters()):
            return None
        if self.recipe.data.augment is not None:
            self.log("encoder cache off: with augmentation every epoch hears different audio")
            return None
        fingerprint = encoder_fingerprint(self.model.encoder, config=self.model.config.encoder)
        return EncoderFeatureCache(self.out / "encoder_cache", fingerprint)

    def _make_corpus(self) -> None:
        data = self.recipe.data
        if data.synth is None or all(Path(p).exists() for p in data.train + data.valid):
            return
        from voxtune.config import load_config
        from voxtune.data.synth import SynthRecipe, synthesize_corpus

        out = Path(data.train[0]).parent
        self.log(f"making the corpus of {data.synth} in {out}")
        summary = synthesize_corpus(load_config(SynthRecipe, data.synth), out)
        self.log(f"made {summary.clips} clips ({summary.seconds / 60:.1f} min of audio)")

    def _dataset(self, manifests: list[str], augment: Any) -> SpeechDataset:
        examples = [example for path in manifests for example in read_manifest(path)]
        if not examples:
            raise TrainError(f"no examples in {', '.join(manifests)}")
        augmenter = Augmenter(augment) if augment is not None else None
        return SpeechDataset(examples, self.model.processor, self.recipe.data.mixture, augmenter=augmenter, seed=self.recipe.train.seed)

    # ---- data ---------------------------------------------------------------------------------

    def _stream(self) -> Iterator[tuple[int, list[int]]]:
        """(epoch, example indices) of every batch from the current position on, epoch after
        epoch: the same on every process. The position counts each batch as it is drawn."""
        while True:
            self.sampler.set_epoch(self.state.epoch)
            for indices in self.sampler.batches()[self.state.batch_in_epoch :]:
                self.state.batch_in_epoch += 1
                yield self.state.epoch, indices
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _batches(self) -> Iterator[tuple[dict[str, Any], list[Example]]]:
        """This process's micro-batches (collated, and the examples in them): of every `world`
        batches drawn, the one at this process's rank. One process takes them all."""
        collate = collator(self.model.processor, pack=self.recipe.train.pack)
        stream = self._stream()
        while True:
            drawn = [next(stream) for _ in range(self.procs.world)]
            epoch, indices = drawn[self.procs.rank]
            self.train_data.set_epoch(epoch)
            examples = [self.train_data[i] for i in indices]
            yield collate(examples), examples

    # ---- loop ---------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train to `train.max_steps`, or stop (with a checkpoint) once `stop_after` steps are
        done, to go on later with `resume`; returns the last logged record."""
        if self.procs.world > 1 and not self.procs.active:  # a second fit: join again
            self.procs = distributed.start()
        try:
            return self._fit(resume, stop_after)
        finally:
            if self._board is not None:
                self._board.close()  # the writer works in the background: finish the file now
                self._board = None
            self.procs.close()

    def _fit(self, resume: bool, stop_after: int | None) -> dict[str, Any]:
        if resume:
            self._resume()
        train, started = self.recipe.train, time.perf_counter()
        batch_loss = self._batch_loss()
        batches = self._batches()
        record: dict[str, Any] = {}
        tokens = audio_seconds = 0.0
        while self.state.step < train.max_steps:
            self.optimizer.zero_grad(set_to_none=True)
            micro = [next(batches) for _ in range(train.grad_accum)]
            counts = [trained_tokens(batch) for batch, _ in micro]
            seconds = sum(clip.duration for batch, _ in micro for clip in batch["clips"])
            total, seconds = self.procs.all_sum([sum(counts), seconds])
            loss_sum = 0.0
            for i, ((batch, examples), count) in enumerate(zip(micro, counts)):
                # This micro-batch's share of the mean over all the step's tokens (all processes);
                # DDP averages the processes' gradients, hence `world`.
                weight = count * self.procs.world / max(1.0, total)
                loss_sum += self._backward(batch_loss, batch, examples, weight, sync=i == len(micro) - 1) * count
            (loss_sum,) = self.procs.all_sum([loss_sum])
            tokens, audio_seconds = tokens + total, audio_seconds + seconds
            # The norm before clipping (the same on every process): logged, since it shows how
            # hard clipping works, and it checks that the gradients are scaled right.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.recipe.optim.grad_clip or math.inf)
            self.optimizer.step()
            self.scheduler.step()
            self.state.step += 1
            elapsed = time.perf_counter() - started
            record = {
                "step": self.state.step, "loss": loss_sum / max(1.0, total), "grad_norm": float(grad_norm),
                "lr": self.scheduler.get_last_lr()[0], "epoch": self.state.epoch,
                "tokens_per_s": tokens / elapsed, "audio_s_per_s": audio_seconds / elapsed,
            }  # fmt: skip
            self._log(record, every=train.log_every)
            if self.valid_data is not None and self.state.step % self.recipe.eval.every == 0:
                self._evaluate_and_log()
            stopping = stop_after is not None and self.state.step >= stop_after
            if self.state.step % self.recipe.output.save_every == 0 or self.state.step == train.max_steps or stopping:
                self.save_checkpoint()
            if stopping:
                break
        return record

    def _batch_loss(self) -> torch.nn.Module:
        """The module the loop calls: `BatchLoss`, inside DDP when there are several processes."""
        train = self.recipe.train
        module = BatchLoss(self.model, self.cache, train.chunk_tokens, bf16=train.precision == "bf16-autocast")
        if not self.procs.active:
            return module
        # No device_ids: the model moves its inputs itself, and the batch holds more than tensors.
        return DistributedDataParallel(module, find_unused_parameters=False)

    def _backward(
        self, batch_loss: torch.nn.Module, batch: dict[str, Any], examples: list[Example], weight: float, *, sync: bool
    ) -> float:
        """Forward and backward of one micro-batch, its loss scaled by `weight`; gradients are
        synced between processes only when `sync` (the step's last micro-batch). Returns the
        unscaled loss."""
        accumulate = not sync and isinstance(batch_loss, DistributedDataParallel)
        with batch_loss.no_sync() if accumulate else contextlib.nullcontext():
            loss = batch_loss(batch, examples)
            (loss * weight).backward()
        return loss.detach().item()

    def _log(self, record: dict[str, Any], *, every: int) -> None:
        if not self.procs.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self._board is None:
            from tensorboardX import SummaryWriter

            self._board = SummaryWriter(str(self.out / TENSORBOARD))
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._board.add_scalar(key, value, record["step"])
        self._board.flush()
        if record["step"] % every == 0:
            self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def _evaluate_and_log(self) -> None:
        """Evaluate on rank 0 while the other processes wait."""
        if self.procs.main:
            self._log({"step": self.state.step, **self.evaluate()}, every=1)
        self.procs.barrier()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss on the validation data, and WER/CER of transcription there (greedy)."""
        import jiwer

        model, limit = self.model, self.recipe.eval.limit
        was_training = model.training
        model.eval()
        examples = self.valid_data.examples[:limit]
        losses = [compute_loss(model, model.processor.collate([self.valid_data[i]]), self.recipe.train.chunk_tokens)
                  for i in range(len(examples))]  # fmt: skip
        result = {"eval_loss": sum(float(l) * n for l, n in losses) / max(1, sum(n for _, n in losses))}
        heard = [e for e in examples if e.text]
        if heard:
            hypotheses = [model.transcribe(e.audio, max_new_tokens=self.recipe.eval.max_new_tokens) for e in heard]
            references = [e.text for e in heard]
            result["wer"] = jiwer.wer(references, [h or "-" for h in hypotheses])
            result["cer"] = jiwer.cer(references, [h or "-" for h in hypotheses])
        model.train(was_training)
        return result

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the trainable weights, optimizer, schedule, RNG and data position atomically.

        Rank 0 writes (the weights and optimizer are the same on every process); every process
        returns once the checkpoint is there.
        """
        target = self.out / CHECKPOINTS / f"step-{self.state.step:07d}"
        rngs = self.procs.all_gather(torch.get_rng_state())  # each process's, for dropout after resume
        if self.procs.main:
            names = {id(p): n for n, p in self.model.named_parameters()}
            extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rngs[0]}
            if self.procs.world > 1:
                extra["rng_per_process"] = rngs
            with atomic_directory(target) as staging:
                save_file({names[id(p)]: p.detach().contiguous().cpu() for p in self.params}, staging / "trainable.safetensors")
                torch.save(extra, staging / "optimizer.pt")
                (staging / "state.json").write_text(json.dumps(asdict(self.state)))
            for old in sorted((self.out / CHECKPOINTS).glob("step-*"))[: -self.recipe.output.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.procs.barrier()
        return target

    def _resume(self) -> None:
        checkpoints = sorted((self.out / CHECKPOINTS).glob("step-*"))
        if not checkpoints:
            raise TrainError(f"nothing to resume: no checkpoints in {self.out / CHECKPOINTS}")
        latest = checkpoints[-1]
        weights = load_file(latest / "trainable.safetensors")
        named = dict(self.model.named_parameters())
        unknown = sorted(set(weights) - set(named))
        if unknown:
            raise TrainError(f"{latest} does not fit this recipe's model: unknown weights {', '.join(unknown[:3])}")
        with torch.no_grad():
            for name, tensor in weights.items():
                named[name].copy_(tensor)
        extra = torch.load(latest / "optimizer.pt", weights_only=True, map_location="cpu")  # the optimizer moves its state
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        rngs = extra.get("rng_per_process")
        # A checkpoint of as many processes gives each its own RNG back; otherwise rank 0's.
        torch.set_rng_state(rngs[self.procs.rank] if rngs and len(rngs) == self.procs.world else extra["rng"])
        self.state = TrainState(**json.loads((latest / "state.json").read_text()))
        # Steps logged after this checkpoint will be run again: drop their records.
        log = self.out / LOG_FILE
        if self.procs.main and log.exists():
            kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.state.step]
            write_atomic(log, "".join(line + "\n" for line in kept).encode())
        self.log(f"resumed from {latest} (step {self.state.step})")

    def export(self) -> Path:
        """Write the trained model to `<output>/model` (LoRA merged in) and, for LoRA, the
        adapters alone to `<output>/adapter` (standard peft format). Rank 0 writes; the other
        processes only return the path."""
        if not self.procs.main:
            return self.out / "model"
        model = self.model
        if hasattr(model.lm, "merge_and_unload"):
            model.lm.save_pretrained(self.out / "adapter")
            model.lm = model.lm.merge_and_unload()
        model.eval()
        model.save_pretrained(self.out / "model")
        return self.out / "model"


def _quiet(message: str) -> None:
    """The log of processes other than rank 0."""
