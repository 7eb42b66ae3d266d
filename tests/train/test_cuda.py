"""The training paths only a GPU runs: a CUDA run against the CPU's on the same recipe, the
encoder cache read onto the GPU, bf16 autocast, QLoRA's 4-bit CUDA kernels, Liger's fused
modules, and packed rows that never build an [L, L] mask. Skipped without a CUDA device; on a
machine with one, `make gpu-check` runs them and the 0.5B training benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import voxtune
from voxtune.config import dump_config
from voxtune.model import tiny
from voxtune.model.packed_attention import use_packed_attention
from voxtune.train.trainer import Trainer, compute_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 6


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture
def _recipe(tiny_recipe):
    """`_recipe(run_dir, *overrides)`: the tiny recipe, 6 steps, every step logged."""
    return lambda run_dir, *overrides: tiny_recipe(run_dir, f"train.max_steps={STEPS}", "train.log_every=1", *overrides)


def _fit(recipe, lines: list[str] | None = None) -> Trainer:
    trainer = Trainer(recipe, log=(lines.append if lines is not None else lambda _: None))
    trainer.fit()
    return trainer


def test_a_cuda_run_follows_the_cpu_run_and_reads_its_cache_on_the_gpu(tmp_path, _recipe):
    gpu = _fit(_recipe(tmp_path / "gpu"))
    assert gpu.model.device.type == "cuda"
    assert gpu.cache is not None and gpu.cache.hits > 0  # later epochs read the encoder's outputs back
    # The same recipe in a process that sees no GPU: the curve a CPU user gets.
    path = tmp_path / "cpu.yaml"
    path.write_text(dump_config(_recipe(tmp_path / "cpu")))
    done = subprocess.run(
        [sys.executable, "-m", "voxtune.cli", "train", str(path)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    gpu_losses, cpu_losses = _losses(tmp_path / "gpu"), _losses(tmp_path / "cpu")
    assert len(gpu_losses) == STEPS
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-3)


def test_bf16_autocast_and_bf16_weights_train_close_to_float32(tmp_path, _recipe):
    _fit(_recipe(tmp_path / "fp32"))
    trainer = Trainer(_recipe(tmp_path / "bf16", "train.precision=bf16-autocast"), log=lambda _: None)
    dtypes: set[torch.dtype] = set()
    layer = trainer.model.base_lm().get_decoder().layers[0]
    layer.self_attn.q_proj.register_forward_hook(lambda module, inputs, out: dtypes.add(out.dtype))
    trainer.fit()
    assert dtypes == {torch.bfloat16}  # the LM's matrix products ran in bf16
    full, half = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert half == pytest.approx(full, rel=0.05)
    assert half[-1] < half[0]
    # bf16 weights: the LM's frozen weights held in bf16 on the GPU, the same curve.
    weights = Trainer(_recipe(tmp_path / "weights", "train.precision=bf16"), log=lambda _: None)
    frozen = [p for p in weights.model.base_lm().parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 and p.device.type == "cuda" for p in frozen)
    weights.fit()
    assert _losses(tmp_path / "weights") == pytest.approx(full, rel=0.05)


def test_qlora_runs_its_4_bit_kernels_on_the_gpu_and_exports_what_it_computes(tmp_path, _recipe):
    pytest.importorskip("bitsandbytes", reason="QLoRA's 4-bit layers need bitsandbytes")
    trainer = Trainer(_recipe(tmp_path, "train.method=qlora", f"train.max_steps={2 * STEPS}"), log=lambda _: None)
    quantized = [
        module.base_layer
        for name, module in trainer.model.base_lm().named_modules()
        if name.endswith("_proj") and hasattr(module, "base_layer")
    ]
    assert quantized and {type(layer).__name__ for layer in quantized} == {"Linear4bit"}
    assert all(layer.weight.device.type == "cuda" for layer in quantized)
    trainer.fit()
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0]
    processor = trainer.model.processor
    batch = processor.collate(
        [processor.encode_messages([{"role": "user", "content": "hi"}], add_generation_prompt=True)]
    )
    with torch.no_grad():
        trained = trainer.model.eval()(batch).logits
        exported = voxtune.load(trainer.export()).to("cuda")
        assert not any(type(m).__name__ == "Linear4bit" for m in exported.modules())  # full precision again
        assert (exported(batch).logits - trained).abs().max() <= 1e-3


def test_liger_fused_modules_train_on_the_same_curve(tmp_path, _recipe):
    pytest.importorskip("liger_kernel", reason="Liger's fused modules need liger-kernel")
    lines: list[str] = []
    _fit(_recipe(tmp_path / "fused"), lines)
    assert any(line.startswith("fused kernels: liger (") for line in lines), lines
    _fit(_recipe(tmp_path / "plain", "train.fused_kernels=false"))
    assert _losses(tmp_path / "fused") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-3)


def test_a_long_packed_row_never_holds_an_l_by_l_mask():
    """128 examples packed into one row of about 22,000 tokens: with attention run example by
    example, training on it takes far less GPU memory than one [L, L] mask in bf16 would (even
    where SDPA falls back to its plain kernel, which keeps each example's scores)."""
    model = tiny("llama").to("cuda").train()
    assert use_packed_attention(model.base_lm())
    processor = model.processor
    conversations = [
        [{"role": "user", "content": f"question {i} " + "word " * 25}, {"role": "assistant", "content": "yes " * 5}]
        for i in range(128)
    ]
    examples = [processor.encode_messages(c, with_labels=True) for c in conversations]
    packed = processor.pack(examples)
    length = packed["input_ids"].shape[1]
    assert length > 20000
    warm_up, _ = compute_loss(model, processor.pack(examples[:2]), chunk_tokens=1024)
    warm_up.backward()  # cuBLAS's workspaces are made here, outside the measurement
    model.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = compute_loss(model, packed, chunk_tokens=1024)
    loss.backward()
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - before
    assert used < length * length * 2, f"{used / 2**20:.0f} MiB for a row of {length} tokens"
