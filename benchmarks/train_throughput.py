"""Training throughput and peak memory: voxtune's trainer against the loop a user would write.

Run from the repository root (about 4 minutes on an idle 2-core CPU, plus a minute to
synthesise the corpus the first time):

    .venv/bin/python benchmarks/train_throughput.py [--data out/bench-data] [--epochs 2] [--batch 8] \
        [--arch qwen2_audio]

One model and one synthesised corpus (made once into --data), trained several ways, each
configuration in a fresh process of its own:

- baseline: `transformers.Trainer` + `peft` LoRA on the LM, as a user would write it: a thin
  module whose forward runs the `SpeechLM` (the frozen encoder on every step) and returns the
  LM's own loss (full [B, L, V] logits); padded batches of `--batch` examples in random order
  (`model.processor.collate`, `train_sampling_strategy="random"`: no length grouping; no
  packing), no data-loader workers, no checkpoints.
- voxtune: `voxtune.train.Trainer` on the same manifests with the same LoRA (r, alpha, the
  family's targets), learning rate, schedule, gradient clipping and seed: length-bucketed
  batches of at most `--batch` examples (the token budget admits `--batch` of the longest
  example, so both take the same number of optimizer steps), packed into one row, the
  encoder's outputs cached on disk (epoch 1 fills the cache, later epochs read it), chunked
  cross-entropy. Its per-step log record, TensorBoard scalars and final checkpoint are part
  of the timed run, as they are part of `fit`.
- ablations: voxtune with one speed feature off at a time, each through its recipe switch:
  packing (`train.pack=false`: padded batches, still length-bucketed), length bucketing
  (`train.bucket=false`: random batches), the encoder cache (`train.cache_encoder=false`),
  chunking of the cross-entropy (`train.chunk_tokens` larger than any batch: one chunk, still
  over the scored rows only, so it measures the chunking alone), the chunked cross-entropy as
  a whole (`train.chunked_loss=false`: the LM's own loss on full logits, as the baseline
  computes it); and one the other way: batches prepared by a background thread
  (`train.prefetch=2`, off by default on the CPU), and QLoRA (`train.method=qlora`: the same
  adapters on an LM whose linear layers hold 4-bit NF4 weights; its saving is in the model's
  resident weights, so compare peak MiB, not +MiB), and activation checkpointing
  (`train.grad_checkpointing=true`: the LM's activations recomputed in backward, memory for
  time), and full fine-tuning (`train.method=full`: every weight of the LM and the projector
  trains, the encoder stays frozen and cached), bf16 autocast (`train.precision=bf16-autocast`),
  and the projector alone (`train.method=projector`: no adapters, the LM frozen; what LoRA's
  own compute costs, and so the most a faster LoRA could give), and compiled decoder layers
  (`train.compile=true`: `torch.compile` compiles in epoch 1, so look at epochs 2+), and bf16
  weights (`train.precision=bf16`: the LM's frozen weights held in bf16 under autocast; like
  QLoRA's, its saving is in the resident weights, so compare peak MiB).
- baseline_bf16: the baseline with `TrainingArguments(bf16=True)` (autocast, float32 weights),
  the one switch a transformers user flips for bf16; with it and bf16_weights both run, a line
  under the table compares the two bf16 runs.

Each configuration trains `--epochs` epochs; an epoch is every training example once. What the
table shows:

- ex/s: training examples per second of wall time, for epoch 1 and for epochs 2+ (the encoder
  cache only pays from epoch 2). Time counts everything the loop does: reading and decoding
  audio, tokenising, collating, log-mel, the encoder (or the cache), forward, backward and the
  optimizer step; it starts at the call to `train()`/`fit()`, and epoch 2 starts when its
  first batch is asked for.
- audio s/s: seconds of training audio per second, epochs 2+.
- steps/ep: optimizer steps per epoch. pos/ep: LM positions per epoch, padding included
  (input_ids elements of the batches), i.e. what the LM computes over.
- peak MiB: the peak resident set size of the process while training (Linux's VmHWM, reset
  through /proc/self/clear_refs once the model, data and trainer are set up); +MiB: that
  peak minus the RSS when training starts, i.e. what training itself added. The memory ratio
  compares the +MiB. With a GPU (both trainers then use it) these are torch.cuda's peak and
  starting allocated bytes instead.
- loss: the mean training loss over the last epoch, a check that each run trains (the runs
  batch the data differently, so the values differ a little).
- speed, memory: epochs 2+ examples/s and +MiB, over the baseline's.

The CPU is shared with whatever else runs: after each run the script says how many cores
other processes kept busy meanwhile, and runs a configuration again (--retries) when that
was over 0.25, keeping the quietest run. Even on an idle machine the same configuration's
epochs 2+ rate drifts by 10-15% over minutes (a virtual machine's CPU); `--rounds N` runs every
configuration N times in turn (baseline, voxtune, ..., then again) and reports each one's
median run, and the rates of every round under the table.

The last line is `throughput_ratio=<x> peak_memory_ratio=<y>`: voxtune over the baseline,
epochs 2+ examples/s and training-phase memory (+MiB).

`--arch qwen2_audio` trains a Qwen2-Audio-shaped checkpoint instead (about 100M parameters,
random weights, saved in the architecture's own layout): a 10-layer 768-wide Qwen2 LM with the
same kind of BPE vocabulary, and a 6-layer 768-wide Whisper-style encoder that reads 30 s
windows (every clip padded to 30 s, as the architecture does). Its baseline is the
architecture's own class, `Qwen2AudioForConditionalGeneration` + peft LoRA on its LM +
`transformers.Trainer`; voxtune loads the same checkpoint and trains it with the same LoRA.

The default model is small but complete: a 4-layer 256-wide Llama-style LM with an 8000-token BPE
vocabulary trained on the synthesiser's text (so the logits are [tokens, 8056]), and a 4-layer
256-wide streaming encoder (random weights, frozen: its cost is what matters here). How much
each feature pays depends on that balance: a larger encoder makes the cache worth more, longer
answers (more scored tokens) make the chunked cross-entropy's share smaller.

`--lm 0.5b` keeps voxtune's architecture at a size users fine-tune: an LM of Qwen2.5-0.5B's
shape (24 layers, 896 wide, 14 query and 2 key/value heads, a 4864-wide MLP, its 151,936-row
vocabulary with tied embeddings: 494M parameters, random weights) over a frozen encoder of
Whisper base's shape (6 layers, 512 wide, 30 s windows). It is made for a GPU:

    .venv/bin/python benchmarks/train_throughput.py --lm 0.5b --device cuda --clips 200 \
        --configs voxtune,baseline_bf16,bf16_weights,full,qlora

(what `make gpu-check` runs after the GPU tests).

On the CPU it runs too (`--device cpu`, with a GPU hidden from both trainers), at several
seconds a step: use a small `--clips` there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

# What each configuration is: (label, recipe overrides of voxtune's `train` section, or None
# for the transformers baseline).
CONFIGS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "baseline": ("transformers.Trainer + peft", None),
    "baseline_bf16": ("transformers.Trainer + peft, bf16", None),
    "voxtune": ("voxtune (all on)", {}),
    "no_pack": ("voxtune, pack off", {"pack": False}),
    "no_cache": ("voxtune, encoder cache off", {"cache_encoder": False}),
    "one_chunk": ("voxtune, CE in one chunk", {"chunk_tokens": 10**9}),
    "full_logits": ("voxtune, full-logits CE", {"chunked_loss": False}),
    "no_bucket": ("voxtune, length buckets off", {"bucket": False}),
    "prefetch": ("voxtune, prefetch thread on", {"prefetch": 2}),
    "qlora": ("voxtune, QLoRA (4-bit LM)", {"method": "qlora"}),
    "checkpointing": ("voxtune, act. checkpointing", {"grad_checkpointing": True}),
    "full": ("voxtune, full fine-tuning", {"method": "full"}),
    "bf16": ("voxtune, bf16 autocast", {"precision": "bf16-autocast"}),
    "no_lora": ("voxtune, projector only", {"method": "projector"}),
    "compile": ("voxtune, compiled layers", {"compile": True}),
    "bf16_weights": ("voxtune, bf16 weights", {"precision": "bf16"}),
}
LANGUAGES = ["en", "de", "fr", "es", "ru", "zh"]
MIXTURE = {"transcribe": 2.0, "language": 1.0, "describe": 1.0, "answer": 1.0}
LORA_R, LORA_ALPHA = 16, 32.0
LR, WARMUP, SEED = 1e-3, 10, 0
# Both trainers take the GPU when there is one (transformers.Trainer and voxtune's alike).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Other processes using more CPU cores than this, on average, make a run's times suspect.
BUSY = 0.25


# ---- setup (parent process) -----------------------------------------------------------------


def make_data(folder: Path, clips: int) -> None:
    """Synthesise the corpus into `folder` unless a same-sized one is already there."""
    from voxtune.config import load_config
    from voxtune.data.synth import SynthRecipe, synthesize_corpus

    recipe = {"seed": 0, "clips": clips, "languages": LANGUAGES, "splits": {"train": 0.9, "valid": 0.1}, "workers": 2}
    stamp = folder / "bench.json"
    if (folder / "train.jsonl").exists() and stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return
    started = time.perf_counter()
    summary = synthesize_corpus(load_config(SynthRecipe, recipe), folder)
    stamp.write_text(json.dumps(recipe))
    print(
        f"synthesised {summary.clips} clips ({summary.seconds / 60:.1f} min of audio) "
        f"in {time.perf_counter() - started:.1f} s"
    )


# The larger LM of `--lm 0.5b`: Qwen2.5-0.5B's shape (494M parameters with its tied embeddings),
# its vocabulary's size included, so the logits cost what they cost a user of that model (the
# BPE trained here fills the first few thousand rows; the others are never a target).
LM_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}
# Its frozen encoder: Whisper base's shape (6 layers, 512 wide, 30 s windows).
ENCODER_05B = {"n_mels": 80, "dim": 512, "layers": 6, "heads": 8}


def make_model(folder: Path, vocab: int, arch: str, lm_size: str = "small") -> Any:
    """Build the benchmark `SpeechLM` (seeded) and save it to `folder`; returns it."""
    if arch == "qwen2_audio":
        return make_qwen2_audio(folder, vocab)
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from voxtune.config import load_config
    from voxtune.data.synth import SynthRecipe, plan
    from voxtune.model import build_speech_lm, prepare_tokenizer
    from voxtune.model.tiny import tiny_encoder_config, tiny_lm_config, train_tokenizer

    # The synthesiser's planner writes the text without rendering audio: a large corpus for BPE.
    texts = [
        p.text for p in plan(load_config(SynthRecipe, {"seed": 1, "clips": 20000, "languages": LANGUAGES}), ["a", "b"])
    ]
    family = "llama" if lm_size == "small" else "qwen2"
    tokenizer = prepare_tokenizer(train_tokenizer(family, vocab_size=vocab, corpus="\n".join(texts)), family)
    torch.manual_seed(SEED)
    if lm_size == "small":
        lm = AutoModelForCausalLM.from_config(tiny_lm_config("llama", tokenizer, hidden=256, layers=4))
        encoder = {"n_mels": 80, "dim": 256, "layers": 4, "heads": 4, "chunk_frames": 4, "left_chunks": 8}
        model = build_speech_lm(lm, tokenizer, encoder_kind="streaming", encoder_config=encoder)
    else:
        special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **LM_05B, **special))
        encoder_config = tiny_encoder_config("whisper", **ENCODER_05B)
        encoder_config["encoder_ffn_dim"] = 4 * ENCODER_05B["dim"]  # Whisper's MLP ratio
        model = build_speech_lm(lm, tokenizer, encoder_kind="whisper", encoder_config=encoder_config)
    transformers_logging.disable_progress_bar()
    model.save_pretrained(str(folder))
    return model


def make_qwen2_audio(folder: Path, vocab: int) -> Any:
    """A Qwen2-Audio-shaped checkpoint with random weights, about 100M parameters (a 10-layer
    768-wide Qwen2 LM and a 6-layer 768-wide Whisper-style encoder with its 30 s window and 2x
    pooling), saved in the architecture's own layout and loaded back through voxtune."""
    from transformers.utils import logging as transformers_logging

    from voxtune.config import load_config
    from voxtune.data.synth import SynthRecipe, plan
    from voxtune.model import load
    from voxtune.model.architectures import qwen2_audio
    from voxtune.model.tiny import train_tokenizer

    texts = [
        p.text for p in plan(load_config(SynthRecipe, {"seed": 1, "clips": 20000, "languages": LANGUAGES}), ["a", "b"])
    ]
    tokenizer = train_tokenizer("qwen2", vocab_size=vocab, corpus="\n".join(texts))
    transformers_logging.disable_progress_bar()
    qwen2_audio.tiny(
        folder,
        hidden=768,
        layers=10,
        heads=12,
        encoder_dim=768,
        encoder_layers=6,
        encoder_heads=12,
        seconds=30,
        tokenizer=tokenizer,
        seed=SEED,
    )
    return load(folder)


def batch_plan(model: Any, manifest: Path, batch: int, epochs: int) -> dict[str, int]:
    """voxtune's batching for this data: a token budget that admits `batch` of the longest
    examples, and the optimizer steps `epochs` epochs take with it (the trainer's own sampler)."""
    from voxtune.data.dataset import LengthBucketSampler, SpeechDataset
    from voxtune.data.manifest import read_manifest

    lengths = SpeechDataset(list(read_manifest(manifest)), model.processor, MIXTURE, seed=SEED).token_lengths()
    max_tokens = batch * max(lengths)
    sampler = LengthBucketSampler(lengths, max_tokens=max_tokens, max_batch=batch, seed=SEED)
    steps = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        steps.append(len(sampler.batches()))
    return {"max_tokens": max_tokens, "max_steps": sum(steps), "steps_last_epoch": steps[-1]}


# ---- measuring (child processes) ------------------------------------------------------------


class Memory:
    """Peak memory of the training phase: call `start()` after setup, `stop()` after training."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.basis = "cuda allocated" if self.cuda else "VmHWM (reset after setup)"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.setup = torch.cuda.memory_allocated()
            return
        try:
            # Writing 5 resets the process's peak RSS (Linux >= 4.0), so the peak read later
            # is the training phase's, not model loading's.
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.basis = "ru_maxrss (whole process, not reset)"
        self.setup = _status_bytes("VmRSS")

    def stop(self) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.basis.startswith("VmHWM"):
            peak = _status_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_bytes": peak, "setup_bytes": self.setup, "memory_basis": self.basis}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """transformers.Trainer + peft, padded batches, the encoder on every step, full logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from voxtune.data.dataset import SpeechDataset
    from voxtune.data.manifest import read_manifest
    from voxtune.model import load

    torch.manual_seed(SEED)  # as voxtune's trainer does before building, so LoRA starts the same
    model = load(args.work / "model")
    targets = list(model.family.lora_targets)
    if args.arch == "qwen2_audio":
        trained = _qwen2_audio_for_trainer(args.work / "model", targets)
    else:
        model.requires_grad_(False)
        model.projector.requires_grad_(True)
        config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.lm = get_peft_model(model.lm, config)
        model.train()
        trained = SpeechLMForTrainer(model)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.epoch_starts: list[float] = []
            self.losses: list[tuple[float, float]] = []  # (epoch, loss)

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.epoch_starts.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append((state.epoch, logs["loss"]))

    dataset = SpeechDataset(list(read_manifest(args.data / "train.jsonl")), model.processor, MIXTURE, seed=SEED)
    clock = Clock()
    positions = [0]

    def collate(examples: list[Any]) -> dict[str, Any]:
        batch = model.processor.collate(examples)
        positions[0] += batch["input_ids"].numel()  # what the LM runs over, padding included
        return batch

    training_args = TrainingArguments(
        output_dir=str(args.work / "baseline"),
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        learning_rate=LR,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=WARMUP,
        train_sampling_strategy="random",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        seed=SEED,
        data_seed=SEED,
        use_cpu=DEVICE == "cpu",
        bf16=args.only == "baseline_bf16",  # autocast, as TrainingArguments(bf16=True) gives a user
    )
    trainer = Trainer(
        model=trained,
        args=training_args,
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[clock],
    )
    memory = Memory(DEVICE)
    memory.start()
    started = time.perf_counter()
    trainer.train()
    ended = time.perf_counter()
    result = memory.stop()
    starts = [started, *clock.epoch_starts[1:]]
    last = [loss for epoch, loss in clock.losses if epoch > args.epochs - 1]
    return {
        **result,
        "epoch_seconds": [b - a for a, b in zip(starts, [*starts[1:], ended], strict=True)],
        "steps": trainer.state.global_step,
        "loss": sum(last) / max(1, len(last)),
        "examples": len(dataset),
        "audio_seconds": sum(dataset.durations()),
        "positions": positions[0],
    }


class SpeechLMForTrainer(torch.nn.Module):
    """What a user writes to hand a `SpeechLM` to transformers.Trainer."""

    accepts_loss_kwargs = False  # the LM's loss is a mean over the batch's tokens already

    def __init__(self, speech_lm: Any) -> None:
        super().__init__()
        self.speech_lm = speech_lm

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        return {"loss": self.speech_lm(batch).loss}


class Qwen2AudioForTrainer(torch.nn.Module):
    """What a user writes to train `Qwen2AudioForConditionalGeneration` with transformers.Trainer:
    the batch's token ids, 30 s log-mel windows and their valid frames into the model's own
    forward (its encoder on every step) and its own loss."""

    accepts_loss_kwargs = False

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        features = batch["audio_features"]  # [N, 128, 3000]
        frames = torch.arange(features.shape[-1])[None] < batch["audio_frames"][:, None]  # [N, 3000]
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=features,
            feature_attention_mask=frames.long(),
            labels=batch["labels"],
        )
        return {"loss": out.loss}


def _qwen2_audio_for_trainer(path: Path, targets: list[str]) -> torch.nn.Module:
    """The checkpoint in its own transformers class with peft LoRA on its LM's `targets`."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    pattern = rf"model\.language_model\..*\.({'|'.join(targets)})"
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=pattern)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, config)
    model.train()
    return Qwen2AudioForTrainer(model)


def run_voxtune(args: argparse.Namespace, name: str, batching: dict[str, Any]) -> dict[str, Any]:
    """voxtune's Trainer with the speed features of `name` on."""
    from voxtune.config import load_config
    from voxtune.train.recipe import TrainRecipe
    from voxtune.train.trainer import Trainer

    train = {
        "method": "lora",
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA},
        "max_steps": batching["max_steps"],
        "max_tokens": batching["max_tokens"],
        "max_batch": args.batch,
        "pack": True,
        "cache_encoder": True,
        "chunk_tokens": 1024,
        "seed": SEED,
        "log_every": 10**6,
        "progress": False,
        **CONFIGS[name][1],
    }
    recipe = load_config(
        TrainRecipe,
        {
            "model": {"load": str(args.work / "model")},
            "data": {"train": [str(args.data / "train.jsonl")], "mixture": MIXTURE},
            "train": train,
            "optim": {
                "lr": LR,
                "warmup_steps": WARMUP,
                "betas": [0.9, 0.98],
                "weight_decay": 0.0,
                "min_lr_ratio": 0.1,
                "grad_clip": 1.0,
            },
            "output": {"dir": str(args.work / name), "save_every": 10**6},
        },
    )
    trainer = Trainer(recipe, log=lambda line: print(line, file=sys.stderr))
    epoch_starts: dict[int, float] = {}
    positions = [0]

    def on_batch(batch: dict[str, Any], examples: list[Any], epoch: int) -> None:
        # When each epoch's first batch is taken, and the LM positions of every batch.
        epoch_starts.setdefault(epoch, time.perf_counter())
        positions[0] += batch["input_ids"].numel()

    trainer.on_batch = on_batch
    memory = Memory(DEVICE)
    memory.start()
    started = time.perf_counter()
    trainer.fit()
    ended = time.perf_counter()
    result = memory.stop()
    starts = [started] + [epoch_starts[e] for e in range(1, args.epochs)]
    if trainer.state.epoch != args.epochs - 1 or trainer.state.batch_in_epoch != len(trainer.sampler.batches()):
        raise RuntimeError(f"{name}: stopped at epoch {trainer.state.epoch}, batch {trainer.state.batch_in_epoch}")
    records = [json.loads(line) for line in (Path(recipe.output.dir) / "log.jsonl").read_text().splitlines()]
    last = [r["loss"] for r in records if r["step"] > batching["max_steps"] - batching["steps_last_epoch"]]
    cache = trainer.cache
    return {
        **result,
        "epoch_seconds": [b - a for a, b in zip(starts, [*starts[1:], ended], strict=True)],
        "steps": trainer.state.step,
        "loss": sum(last) / max(1, len(last)),
        "examples": len(trainer.train_data),
        "audio_seconds": sum(trainer.train_data.durations()),
        "positions": positions[0],
        "cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses, "writes": cache.writes},
    }


def child(args: argparse.Namespace) -> None:
    """Run one configuration and write its numbers to <work>/<name>.json."""
    batching = json.loads((args.work / "plan.json").read_text())
    result = run_baseline(args) if CONFIGS[args.only][1] is None else run_voxtune(args, args.only, batching)
    (args.work / f"{args.only}.json").write_text(json.dumps(result))


def run_child(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run configuration `name` in a fresh process; its numbers, plus `others`: the CPU cores
    that other processes on the machine kept busy meanwhile, on average."""
    shutil.rmtree(work / name, ignore_errors=True)  # an empty output folder (and encoder cache)
    command = [
        sys.executable,
        __file__,
        "--only",
        name,
        "--work",
        str(work),
        "--data",
        str(args.data),
        "--epochs",
        str(args.epochs),
        "--batch",
        str(args.batch),
        "--arch",
        args.arch,
        "--lm",
        args.lm,
        "--device",
        args.device,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both trainers take a GPU they can see
    busy, ours, started = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
    others = ((_busy_cpu_seconds() - busy) - (_children_cpu_seconds() - ours)) / wall
    return {**json.loads((work / f"{name}.json").read_text()), "others": max(0.0, others), "wall": wall}


def quietest_run(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run configuration `name`, again (up to --retries times) while other processes kept more
    than BUSY cores busy; the run they disturbed least."""
    done = []
    for attempt in range(args.retries + 1):
        result = run_child(name, args, work)
        cache = result.get("cache")
        print(
            f"  ran {name} in {result['wall']:.0f} s; other processes kept {result['others']:.2f} cores busy"
            + (f"; encoder cache: {cache['misses']} misses, {cache['hits']} hits" if cache else "")
        )
        done.append(result)
        if result["others"] <= BUSY:
            break
        if attempt < args.retries:
            print(f"    the machine was busy (over {BUSY} cores used by others): running {name} again")
    return min(done, key=lambda r: r["others"])


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---- report ---------------------------------------------------------------------------------


def rates(result: dict[str, Any]) -> tuple[float, float, float]:
    """(epoch 1 examples/s, epochs 2+ examples/s, epochs 2+ audio seconds/s)."""
    seconds = result["epoch_seconds"]
    later = sum(seconds[1:]) or float("nan")
    n = len(seconds) - 1
    return result["examples"] / seconds[0], n * result["examples"] / later, n * result["audio_seconds"] / later


def table(results: dict[str, dict[str, Any]], epochs: int) -> tuple[float, float]:
    """Print the results; returns (throughput ratio, memory ratio) of voxtune over the baseline."""
    mib = 2**20
    base = results["baseline"]
    base_rate = rates(base)[1]
    base_growth = base["peak_bytes"] - base["setup_bytes"]
    header = (
        f"{'configuration':<33} {'ep1 ex/s':>8} {'ep2+ ex/s':>9} {'ep2+ audio s/s':>14} {'steps/ep':>8} "
        f"{'pos/ep':>7} {'peak MiB':>8} {'+MiB':>5} {'loss':>5} {'speed':>6} {'memory':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        first, later, audio = rates(result)
        growth = result["peak_bytes"] - result["setup_bytes"]
        print(
            f"{CONFIGS[name][0]:<33} {first:>8.1f} {later:>9.1f} {audio:>14.1f} {result['steps'] / epochs:>8.1f} "
            f"{result['positions'] / epochs:>7.0f} {result['peak_bytes'] / mib:>8.0f} {growth / mib:>5.0f} "
            f"{result['loss']:>5.2f} {later / base_rate:>5.2f}x {growth / base_growth:>5.2f}x"
        )
    if "baseline_bf16" in results and "bf16_weights" in results:
        half, ours_half = results["baseline_bf16"], results["bf16_weights"]
        print(
            f"bf16 against bf16: {CONFIGS['bf16_weights'][0]} {rates(ours_half)[1] / rates(half)[1]:.2f}x the "
            f"examples/s of {CONFIGS['baseline_bf16'][0]}, at {ours_half['peak_bytes'] / half['peak_bytes']:.2f}x "
            "its peak MiB"
        )
    ours = results["voxtune"]
    return rates(ours)[1] / base_rate, (ours["peak_bytes"] - ours["setup_bytes"]) / base_growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("out/bench-data"), help="corpus folder (made if missing)")
    parser.add_argument("--clips", type=int, default=1000, help="clips to synthesise (90%% train)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per configuration (at least 2)")
    parser.add_argument("--batch", type=int, default=8, help="examples per batch (voxtune: at most)")
    parser.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary of the LM")
    parser.add_argument(
        "--arch",
        choices=["voxtune", "qwen2_audio"],
        default="voxtune",
        help="the model: voxtune's own (default) or a Qwen2-Audio-shaped checkpoint of about 100M parameters",
    )
    parser.add_argument(
        "--lm",
        choices=["small", "0.5b"],
        default="small",
        help="with --arch voxtune: the 6.5M-parameter LM (default) or Qwen2.5-0.5B's shape (494M) over a "
        "Whisper-base-shaped frozen encoder",
    )
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where both trainers run (default: the GPU when there is one)",
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="which configurations to run (baseline and voxtune always)"
    )
    parser.add_argument(
        "--retries", type=int, default=1, help="runs of a configuration again while other processes use the CPU"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, in turn, and report each one's median run",
    )
    parser.add_argument(
        "--work", type=Path, help="keep the model, checkpoints and logs here (default: a temporary folder)"
    )
    parser.add_argument("--only", choices=list(CONFIGS), help="run one configuration in this process (internal)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the encoder cache pays from epoch 2 on")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.lm != "small" and args.arch != "voxtune":
        parser.error("--lm goes with --arch voxtune")
    if args.only:
        child(args)
        return

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device {device}")
    args.data.mkdir(parents=True, exist_ok=True)
    make_data(args.data, args.clips)
    names = ["baseline", "voxtune"] + [
        n for n in args.configs.split(",") if n in CONFIGS and n not in ("baseline", "voxtune")
    ]
    if "qlora" in names and importlib.util.find_spec("bitsandbytes") is None:
        print("skipping qlora: its 4-bit layers need bitsandbytes (pip install 'voxtune[qlora]')")
        names.remove("qlora")
    with tempfile.TemporaryDirectory(prefix="voxtune-bench-") as temporary:
        work = args.work or Path(temporary)
        model = make_model(work / "model", args.vocab, args.arch, args.lm)
        batching = batch_plan(model, args.data / "train.jsonl", args.batch, args.epochs)
        (work / "plan.json").write_text(json.dumps(batching))
        count = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
        print(
            f"model: LM {count(model.lm):.2f}M parameters (vocabulary {len(model.tokenizer)} tokens, "
            f"{model.lm.get_input_embeddings().num_embeddings} rows), "
            f"encoder {count(model.encoder):.2f}M (frozen), projector {count(model.projector):.2f}M"
        )
        records = [json.loads(line) for line in (args.data / "train.jsonl").read_text().splitlines()]
        examples, seconds = len(records), sum(r["meta"]["duration"] for r in records)
        print(
            f"data: {examples} training clips, {seconds / 60:.1f} min of audio, in {args.data}; {args.epochs} epochs; "
            f"batches of {args.batch} (voxtune: at most {args.batch} and {batching['max_tokens']} tokens)"
        )
        del model
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for turn in range(args.rounds):
            if args.rounds > 1:
                print(f"round {turn + 1} of {args.rounds}")
            for name in names:
                runs[name].append(quietest_run(name, args, work))
    print()
    # Each configuration's median run by epochs 2+ examples/s (its memory comes with it).
    results = {name: sorted(done, key=lambda r: rates(r)[1])[(len(done) - 1) // 2] for name, done in runs.items()}
    speed, memory = table(results, args.epochs)
    if args.rounds > 1:
        print("epochs 2+ examples/s of each round (the table shows the median run):")
        for name, done in runs.items():
            print(f"  {CONFIGS[name][0]:<33} " + ", ".join(f"{rates(r)[1]:.1f}" for r in done))
    print(f"memory: {results['voxtune']['memory_basis']}; ratio of the training-phase increase (+MiB)")
    print(f"throughput_ratio={speed:.2f} peak_memory_ratio={memory:.2f}")


if __name__ == "__main__":
    main()
