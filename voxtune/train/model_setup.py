"""The model a training recipe trains: built or loaded, frozen and wrapped for its method.

model = build_model(recipe.model)
params = prepare_trainable(model, recipe.train)    # full, lora, qlora or projector
hold_frozen_in_bf16(model.lm)                       # train.precision=bf16
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import torch

from voxtune.data.example import SpeechExample
from voxtune.errors import InputError
from voxtune.model import SpeechLM
from voxtune.train.recipe import ModelSection, TrainSection


class TrainError(InputError):
    """A recipe that cannot run as written (bad data, an impossible method for the model)."""


def build_model(section: ModelSection, corpus: str | None = None) -> SpeechLM:
    """The model a recipe names: loaded, built tiny, or composed from pretrained parts.
    `corpus`: the text a tiny model's tokenizer learns from when `tokenizer_corpus` is data."""
    from voxtune.model import compose, load, tiny
    from voxtune.model.checkpoint import load_encoder_weights

    if section.load is not None:
        return load(section.load)
    if section.tiny is not None:
        t = section.tiny
        options: dict[str, Any] = {"corpus": corpus} if t.tokenizer_corpus == "data" else {}
        pretrained = None
        if isinstance(section.encoder, str):  # a pretrained Whisper encoder under the new LM
            from voxtune.model.checkpoint import resolve
            from voxtune.model.whisper_encoder import load_whisper_encoder

            whisper_dir = resolve(section.encoder)
            pretrained = load_whisper_encoder(whisper_dir)
            options["encoder_config"] = json.loads((whisper_dir / "config.json").read_text())
        sizes = t.model_dump(exclude={"lm", "encoder", "tokenizer_corpus"})
        model = tiny(t.lm, t.encoder, projector_norm_mid=section.projector_norm_mid, **options, **sizes)
        if pretrained is not None:
            model.encoder.load_state_dict(pretrained.state_dict())
    else:
        assert section.lm is not None and section.encoder is not None  # ModelSection's check: lm with encoder
        model = compose(section.lm, section.encoder, projector_norm_mid=section.projector_norm_mid)
    if section.init_encoder is not None:
        load_encoder_weights(model, section.init_encoder)
    return model


def training_text(examples: Sequence[SpeechExample]) -> str:
    """Every text of `examples` (transcripts, answers, written instructions), one per line, in
    order: what a tokenizer trained from scratch learns from."""
    lines = []
    for example in examples:
        lines += [t for t in (example.text, example.answer, example.instruction) if t]
    return "\n".join(lines)


def prepare_trainable(model: SpeechLM, train: TrainSection) -> list[torch.nn.Parameter]:
    """Freeze and wrap `model` for `train.method`; returns the parameters that train.

    full: everything but the encoder (unless `train_encoder`); lora / qlora: LoRA adapters
    (through peft, so adapters are standard) on the LM and/or the encoder; projector: the
    projector only. The projector trains in every method when `train.train_projector` says so
    (by default: for a new projector, not for a pretrained architecture's). qlora first turns
    the LM's linear layers into 4-bit NF4 ones (bitsandbytes), in place.
    """
    model.requires_grad_(False)
    if train.method == "full":
        model.lm.requires_grad_(True)
        model.encoder.requires_grad_(train.train_encoder)
    elif train.method in ("lora", "qlora"):
        lora = train.lora
        if train.method == "qlora":
            quantize_lm(model)
        lm_targets = lora.targets or list(model.family.lora_targets) if lora.lm else []
        encoder_targets = (
            (lora.encoder_targets or list(getattr(model.encoder, "lora_targets", ()))) if lora.encoder else []
        )
        check_targets(model.base_lm(), lm_targets, "train.lora.targets", lora.lm)
        check_targets(model.encoder, encoder_targets, "train.lora.encoder_targets", lora.encoder)
        model.add_adapters(lm_targets, encoder_targets, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout)
    train_projector = train.train_projector
    if train_projector is None:
        train_projector = model.trains_projector_by_default or train.method == "projector"
    model.projector.requires_grad_(train_projector)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"train.method={train.method} with these settings leaves nothing to train")
    return params


def hold_frozen_in_bf16(lm: torch.nn.Module) -> int:
    """Cast the frozen floating-point weights of `lm` (a `SpeechLM`'s LM, or a distillation
    teacher's frozen copy of one) to bfloat16 in place, for `train.precision=bf16`; returns how
    many tensors were cast. Trained weights (adapters, a fully trained LM) stay float32, as the
    optimizer's master copies must. Tied weights stay tied (the parameter objects are kept).
    A 4-bit LM (QLoRA) computes in bf16 from then on."""
    count = 0
    for parameter in lm.parameters():
        if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.bfloat16:
            parameter.data = parameter.data.to(torch.bfloat16)
            count += 1
    for module in lm.modules():
        if type(module).__name__ == "Linear4bit":  # bitsandbytes' layer: its matmul dtype
            cast(Any, module).compute_dtype = torch.bfloat16
    return count


def check_targets(module: torch.nn.Module, targets: list[str], key: str, wanted: bool) -> None:
    """Raise `TrainError` naming `key` when LoRA is `wanted` on `module` but `targets` is empty
    or names layers it does not have."""
    if not wanted:
        return
    present = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    missing = sorted(set(targets) - present)
    if not targets or missing:
        raise TrainError(f"{key}: the model has no modules named {', '.join(missing) or '(none given)'}")


def quantize_lm(model: SpeechLM) -> int:
    """Swap the LM's linear layers (not its output head) for 4-bit NF4 ones (bitsandbytes), in
    place, for QLoRA; returns how many were swapped. Runs on the CPU and on CUDA; matmuls keep
    the model's dtype. Raises TrainError without bitsandbytes."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainError("train.method=qlora needs bitsandbytes: pip install 'voxtune[qlora]'")
    from voxtune.model.quantize import quantize_linears

    lm = model.base_lm()
    dtype = lm.get_input_embeddings().weight.dtype
    return quantize_linears(lm, skip=[lm.get_output_embeddings()], compute_dtype=dtype)


def fused_kernels(model: SpeechLM, train: TrainSection) -> str:
    """Swap in Liger Kernel's fused RMSNorm and SwiGLU modules where they run (CUDA, Liger
    installed, `train.fused_kernels` on); returns what was chosen, for the start-up log.
    The CPU path is the reference: the modules' own PyTorch code."""
    if not train.fused_kernels:
        return "off (train.fused_kernels=false)"
    if model.device.type != "cuda":
        return f"none on {model.device.type} (the PyTorch reference path)"
    try:
        from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP
    except ImportError:
        return "none (pip install liger-kernel for fused kernels on CUDA)"
    lm = model.base_lm()
    swapped = {"rms_norm": 0, "swiglu": 0}
    for name, module in list(lm.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        kind = type(module).__name__
        # Llama-style RMSNorm (x * rsqrt(mean(x^2) + eps) * weight) only: Gemma's (1 + weight)
        # norms keep `eps` instead of `variance_epsilon` and are left alone.
        if kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            with torch.device("meta"):  # its own weight is replaced by the model's
                fused = LigerRMSNorm(module.weight.shape[0], eps=module.variance_epsilon)
            fused.weight, label = module.weight, "rms_norm"
        elif kind.endswith("MLP") and {"gate_proj", "up_proj", "down_proj"} <= set(dict(module.named_children())):
            if getattr(lm.config, "hidden_act", None) not in ("silu", "swish"):
                continue
            with torch.device("meta"):  # its own linear layers are replaced by the model's (LoRA included)
                fused = LigerSwiGLUMLP(lm.config)
            fused.gate_proj, fused.up_proj, fused.down_proj = module.gate_proj, module.up_proj, module.down_proj
            label = "swiglu"
        else:
            continue
        setattr(parent, child, fused)
        swapped[label] += 1
    chosen = ", ".join(f"{kind} x{count}" for kind, count in swapped.items() if count)
    return f"liger ({chosen})" if chosen else "none (no module this LM has is one Liger fuses)"


def compile_layers(model: SpeechLM) -> str:
    """Compile each of the LM's decoder layers in place (`torch.compile`, dynamic shapes, since
    packed rows change length every step); returns what was compiled, for the start-up log.
    The layers keep their names and weights, so checkpoints and exports are unchanged."""
    layers = getattr(model.base_lm().get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return "nothing (the LM has no decoder layers to compile)"
    for layer in layers:
        layer.compile(dynamic=True)
    return f"{len(layers)} decoder layers (torch.compile, dynamic shapes)"
