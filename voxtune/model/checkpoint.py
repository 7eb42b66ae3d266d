"""The checkpoint format: a standard Hugging Face causal-LM directory plus two voxtune files.

    config.json, model.safetensors, generation_config.json   the LM, loadable by transformers alone
    tokenizer.json, tokenizer_config.json, chat_template...  its tokenizer with voxtune's tokens
    voxtune.json                                             encoder and projector config
    audio.safetensors                                        encoder.* and projector.* weights

Because the LM files sit at the top, `AutoModelForCausalLM.from_pretrained(dir)` and tools
built on it (GGUF converters, vLLM) read the language model without knowing about voxtune.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from voxtune.errors import InputError
from voxtune.model.projector import Projector
from voxtune.model.speech_lm import SpeechLM, SpeechLMConfig, build_encoder

CONFIG_FILE = "voxtune.json"
AUDIO_WEIGHTS = "audio.safetensors"


class ModelLoadError(InputError):
    """A checkpoint that is missing, incomplete or does not match its config."""


def save(model: SpeechLM, directory: str | os.PathLike) -> Path:
    """Write `model` to `directory` atomically: into a temporary sibling, then renamed into place,
    so a crash never leaves a half-written checkpoint where a good one was."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.lm.save_pretrained(staging)
        model.tokenizer.save_pretrained(staging)
        audio_state = {
            f"{name}.{key}": tensor.detach().contiguous().cpu()
            for name in ("encoder", "projector")
            for key, tensor in getattr(model, name).state_dict().items()
        }
        save_file(audio_state, staging / AUDIO_WEIGHTS, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, retired / target.name)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def resolve(name: str | os.PathLike | None) -> Path:
    """A local checkpoint directory for `name`: a directory, or a Hugging Face repo id resolved
    through the hub cache (downloaded only because the caller named it)."""
    if name is None:
        raise ModelLoadError(
            "no built-in model is installed yet; pass a model directory (e.g. one saved with "
            "SpeechLM.save_pretrained) or a Hugging Face repo id"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if path.exists():
        raise ModelLoadError(f"{text} is a file; a model is a directory")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            raise ModelLoadError(f"cannot get model {text!r} from the Hugging Face hub: {error}") from None
    raise ModelLoadError(f"no model directory at {text}")


def load(
    name: str | os.PathLike | None = None, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> SpeechLM:
    """Load a `SpeechLM` saved by `save`, checking every weight name against the model.

    Raises:
        ModelLoadError: the directory is missing, not a voxtune model, or its weights do not
            match (each missing or unexpected key is named).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(f"{path} is not a voxtune model (no {CONFIG_FILE})")
    try:
        config = SpeechLMConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise ModelLoadError(f"{config_path}: {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=dtype or torch.float32)
    _check_keys("LM", sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", [])))
    encoder = build_encoder(config.encoder_kind, config.encoder)
    projector = Projector(encoder.dim, lm.config.hidden_size, stack=config.projector_stack, hidden=config.projector_hidden)
    model = SpeechLM(encoder, projector, lm, tokenizer, config)
    weights_path = path / AUDIO_WEIGHTS
    if not weights_path.is_file():
        raise ModelLoadError(f"{path} has no {AUDIO_WEIGHTS}")
    state = load_file(weights_path)
    expected = {f"{name}.{key}" for name in ("encoder", "projector") for key in getattr(model, name).state_dict()}
    _check_keys("audio", sorted(expected - set(state)), sorted(set(state) - expected))
    for name in ("encoder", "projector"):
        prefix = f"{name}."
        getattr(model, name).load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device or "cpu").eval()


def _check_keys(part: str, missing: list[str], unexpected: list[str]) -> None:
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    if problems:
        raise ModelLoadError(f"{part} weights do not match the model: {'; '.join(problems)}")
