"""A voxtune model with a Whisper encoder in the Hugging Face Ultravox layout, which vLLM serves
with its native Ultravox implementation and llama.cpp's converter reads.

    audio_tower.*            voxtune's Whisper encoder (transformers' WhisperEncoder names)
    multi_modal_projector.*  ln_pre, linear_1 ([up; gate] rows), ln_mid or ln_post, linear_2
    language_model.*         the causal LM as it is

voxtune's projector is Ultravox's up to names and the order of `linear_1`'s halves (voxtune's
rows are [gate; up]), so the export is exact. vLLM takes the processor from the checkpoint's
remote code: processor_config.json's `auto_map` names Ultravox's own (on the Hub, fixie-ai), so
serving it in vLLM needs `--trust-remote-code`, as any Ultravox checkpoint does (untested here:
no vLLM on these machines).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from voxtune.export import ExportError
from voxtune.model import SpeechLM
from voxtune.tags import AUDIO_TOKEN

# Where Ultravox's remote code (processor, config and model classes) lives on the Hub.
ULTRAVOX_CODE = "fixie-ai/ultravox-v0_5-llama-3_2-1b"


def check_exportable(model: SpeechLM, target: str) -> None:
    """Raise `ExportError` when `model` has no counterpart in the Ultravox or GGUF layouts."""
    kind = getattr(model.config, "encoder_kind", None)
    if getattr(model, "architecture", None) is not None:
        raise ExportError(
            f"this is a {model.architecture} checkpoint: --to {target} exports voxtune's own models "
            "(a Whisper encoder, voxtune's projector, any causal LM) and Ultravox checkpoints to "
            "--to ultravox; use --to merged"
        )
    if kind != "whisper":
        raise ExportError(
            f"--to {target}: this model's {kind} encoder has no counterpart in vLLM or llama.cpp "
            "(both run a Whisper encoder); export it with --to merged or --to adapters"
        )


def ultravox_state(model: SpeechLM) -> dict[str, torch.Tensor]:
    """The model's weights under Ultravox's names."""
    projector = model.projector
    gate, up = projector.gate_up.weight.chunk(2, dim=0)  # voxtune's rows: [gate; up]
    state = {f"audio_tower.{k}": v for k, v in model.encoder.state_dict().items()}
    state |= {
        "multi_modal_projector.ln_pre.weight": projector.norm_in.weight,
        "multi_modal_projector.linear_1.weight": torch.cat([up, gate]),  # Ultravox's: [up; gate]
        "multi_modal_projector.linear_2.weight": projector.down.weight,
    }
    if projector.norm_mid is not None:
        state["multi_modal_projector.ln_mid.weight"] = projector.norm_mid.weight
    elif projector.norm_out is not None:  # the projector has one of the two
        state["multi_modal_projector.ln_post.weight"] = projector.norm_out.weight
    state |= {f"language_model.{k}": v for k, v in model.lm.state_dict().items()}
    return {k: v.detach().contiguous() for k, v in state.items()}


def ultravox_config(model: SpeechLM) -> dict[str, Any]:
    """config.json of the export: every part inline, the projector's settings written out."""
    encoder = dict(model.config.encoder)
    lm_config = cast(PreTrainedModel, model.lm).config
    # Ultravox's remote code runs its unpadded, masked Whisper encoder only when the audio
    # config's name says whisper; otherwise it builds a plain one that insists on 30 s.
    audio = {"model_type": "whisper", "_name_or_path": "whisper-encoder", **encoder}
    return {
        "model_type": "ultravox",
        "architectures": ["UltravoxModel"],
        "audio_config": audio,
        "text_config": lm_config.to_dict(),
        "hidden_size": 2 * model.config.projector_hidden,
        "stack_factor": model.config.projector_stack,
        "projector_act": "swiglu",
        "projector_ln_mid": model.projector.norm_mid is not None,
        "norm_init": 0.4,
        "audio_token_index": model.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        "vocab_size": lm_config.vocab_size,
        "ignore_index": -100,
    }


def write_ultravox(model: SpeechLM, directory: Path) -> None:
    """Write `model` into `directory` (which exists and is empty) in the Ultravox layout."""
    import json

    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    check_exportable(model, "ultravox")
    # A tied head is written as a copy too: every reader takes it, and skips it if it ties.
    save_file(_unshared(ultravox_state(model)), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(ultravox_config(model), indent=2) + "\n")
    cast(PreTrainedModel, model.lm).generation_config.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=model.config.n_mels).save_pretrained(directory)
    # Only the processor is remote code (vLLM has none of its own for Ultravox); named here, not in
    # config.json, so loading the config or tokenizer never asks to run code.
    processor = {
        "processor_class": "UltravoxProcessor",
        "auto_map": {"AutoProcessor": f"{ULTRAVOX_CODE}--ultravox_processing.UltravoxProcessor"},
        "audio_padding": "longest",
        "encoder_ds_factor": 2,
        "stack_factor": model.config.projector_stack,
        "audio_placeholder": AUDIO_TOKEN,
        "audio_context_size": 3000,
    }
    (directory / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that share memory, which safetensors refuses to write twice."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        pointer = tensor.data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out
