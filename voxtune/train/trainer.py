"""The training loop: builds the model and data from a recipe, trains, evaluates, checkpoints.

    voxtune train recipes/quickstart.yaml [key=value ...] [--resume]

Checkpoints hold the trainable weights, the optimizer, the schedule, the RNG and the position
in the data, written atomically; `--resume` continues from the newest one and gives the same
loss curve as a run that never stopped (the data order is a function of (seed, epoch), so the
position is all that needs saving).
"""

from __future__ import annotations

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
from torch.utils.data import DataLoader

from voxtune.data.augment import Augmenter
from voxtune.data.dataset import LengthBucketSampler, SpeechDataset, collator
from voxtune.data.manifest import read_manifest
from voxtune.errors import InputError
from voxtune.files import atomic_directory, write_atomic
from voxtune.model import SpeechLM
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
    return loss, int((labels[:, 1:] != -100).sum())


def _schedule(recipe: TrainRecipe) -> Callable[[int], float]:
    warmup, total, floor = recipe.optim.warmup_steps, recipe.train.max_steps, recipe.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """One training run of a recipe. `fit()` trains to `train.max_steps`."""

    def __init__(self, recipe: TrainRecipe, *, log: Callable[[str], None] = print) -> None:
        self.recipe = recipe
        self.log = log
        self.out = Path(recipe.output.dir)
        torch.manual_seed(recipe.train.seed)
        self.model = build_model(recipe.model)
        self.params = prepare_trainable(self.model, recipe.train)
        self.model.train()
        if recipe.train.grad_checkpointing:
            # Non-reentrant: the inputs are embeddings, not leaves that require grad.
            self.model.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.cache = self._encoder_cache()
        self._make_corpus()
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

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on, epoch after epoch."""
        collate = collator(self.model.processor, pack=self.recipe.train.pack)
        while True:
            self.train_data.set_epoch(self.state.epoch)
            self.sampler.set_epoch(self.state.epoch)
            batches = self.sampler.batches()[self.state.batch_in_epoch :]
            for indices in batches:
                self.state.batch_in_epoch += 1
                items = [self.train_data[i] for i in indices]
                batch = collate(items)
                yield with_cached_audio(batch, self.model, items, self.cache) if self.cache is not None else batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # ---- loop ---------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train to `train.max_steps`, or stop (with a checkpoint) once `stop_after` steps are
        done, to go on later with `resume`; returns the last logged record."""
        if resume:
            self._resume()
        train, started = self.recipe.train, time.perf_counter()
        batches = self._batches()
        record: dict[str, Any] = {}
        tokens = audio_seconds = 0.0
        while self.state.step < train.max_steps:
            self.optimizer.zero_grad(set_to_none=True)
            losses, counts = [], []
            for _ in range(train.grad_accum):
                batch = next(batches)
                with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16-autocast"):
                    loss, count = compute_loss(self.model, batch, train.chunk_tokens)
                (loss * count).backward()  # summed, then divided by all tokens of the step
                losses.append(loss.detach().item() * count)
                counts.append(count)
                tokens += count
                audio_seconds += sum(clip.duration for clip in batch["clips"])
            total = max(1, sum(counts))
            for p in self.params:
                if p.grad is not None:
                    p.grad /= total
            if self.recipe.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.recipe.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.state.step += 1
            elapsed = time.perf_counter() - started
            record = {
                "step": self.state.step, "loss": sum(losses) / total, "lr": self.scheduler.get_last_lr()[0],
                "epoch": self.state.epoch, "tokens_per_s": tokens / elapsed, "audio_s_per_s": audio_seconds / elapsed,
            }  # fmt: skip
            self._log(record, every=train.log_every)
            if self.valid_data is not None and self.state.step % self.recipe.eval.every == 0:
                self._log({"step": self.state.step, **self.evaluate()}, every=1)
            stopping = stop_after is not None and self.state.step >= stop_after
            if self.state.step % self.recipe.output.save_every == 0 or self.state.step == train.max_steps or stopping:
                self.save_checkpoint()
            if stopping:
                break
        if self._board is not None:
            self._board.close()  # the writer works in the background: finish the file now
            self._board = None
        return record

    def _log(self, record: dict[str, Any], *, every: int) -> None:
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
        """Write the trainable weights, optimizer, schedule, RNG and data position atomically."""
        target = self.out / CHECKPOINTS / f"step-{self.state.step:07d}"
        names = {id(p): n for n, p in self.model.named_parameters()}
        with atomic_directory(target) as staging:
            save_file({names[id(p)]: p.detach().contiguous().cpu() for p in self.params}, staging / "trainable.safetensors")
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state()},
                staging / "optimizer.pt",
            )  # fmt: skip
            (staging / "state.json").write_text(json.dumps(asdict(self.state)))
        for old in sorted((self.out / CHECKPOINTS).glob("step-*"))[: -self.recipe.output.keep]:
            shutil.rmtree(old, ignore_errors=True)
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
        extra = torch.load(latest / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        self.state = TrainState(**json.loads((latest / "state.json").read_text()))
        # Steps logged after this checkpoint will be run again: drop their records.
        log = self.out / LOG_FILE
        if log.exists():
            kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.state.step]
            write_atomic(log, "".join(line + "\n" for line in kept).encode())
        self.log(f"resumed from {latest} (step {self.state.step})")

    def export(self) -> Path:
        """Write the trained model to `<output>/model` (LoRA merged in) and, for LoRA, the
        adapters alone to `<output>/adapter` (standard peft format)."""
        model = self.model
        if hasattr(model.lm, "merge_and_unload"):
            model.lm.save_pretrained(self.out / "adapter")
            model.lm = model.lm.merge_and_unload()
        model.eval()
        model.save_pretrained(self.out / "model")
        return self.out / "model"
