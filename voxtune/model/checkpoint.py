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
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from voxtune.errors import InputError
from voxtune.files import atomic_directory
from voxtune.model.projector import Projector
from voxtune.model.speech_lm import SpeechLM, SpeechLMConfig, build_encoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CONFIG_FILE = "voxtune.json"
# voxtune-tiny, trained by recipes/voxtune-tiny-v3 and shipped in the package: the model when none is named.
BUILTIN = Path(__file__).resolve().parents[1] / "models" / "voxtune-tiny"
AUDIO_WEIGHTS = "audio.safetensors"


class ModelLoadError(InputError):
    """A checkpoint that is missing, incomplete or does not match its config."""


def save(model: SpeechLM, directory: str | os.PathLike, *, extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` to `directory` atomically: into a temporary sibling, then renamed into place,
    so a crash never leaves a half-written checkpoint where a good one was. `extra_files`
    (name -> text) are written with it, e.g. a record of how the model was trained.

    An existing `directory` is replaced only when it is empty or an earlier voxtune checkpoint;
    anything else in it is never deleted (`ModelLoadError`).
    """
    target = check_replaceable(directory)
    with atomic_directory(target) as staging:
        cast("PreTrainedModel", model.lm).save_pretrained(staging)  # a transformers causal LM
        model.tokenizer.save_pretrained(staging)
        audio_state = {
            f"{name}.{key}": _compact(tensor.detach().contiguous().cpu())
            for name in ("encoder", "projector")
            for key, tensor in getattr(model, name).state_dict().items()
        }
        save_file(audio_state, staging / AUDIO_WEIGHTS, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return target


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float16 when that holds every value exactly, else as it is. A pretrained
    encoder released in half precision (Whisper's) then ships at half the size, losslessly;
    loading widens it back to the module's dtype."""
    if tensor.dtype == torch.float32 and torch.equal(tensor.half().float(), tensor):
        return tensor.half()
    return tensor


def check_replaceable(directory: str | os.PathLike) -> Path:
    """The resolved `directory` a model may be saved to: new, empty, or an earlier checkpoint
    voxtune reads (its own or a known architecture's); anything else is never deleted
    (`ModelLoadError`)."""
    from voxtune.model.architectures import architecture_name

    target = Path(directory).expanduser().resolve()
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return target
    if target.is_dir() and ((target / CONFIG_FILE).is_file() or architecture_name(target) is not None):
        return target
    raise ModelLoadError(f"will not save over {target}: it holds files that are not a model checkpoint")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(name: str | os.PathLike | None) -> Path:
    """A local checkpoint directory for `name`: a directory, or a Hugging Face repo id resolved
    through the hub cache (downloaded only because the caller named it)."""
    if name is None:
        if not (BUILTIN / CONFIG_FILE).is_file():
            raise ModelLoadError(
                f"the built-in model is not installed (no {BUILTIN}); pass a model directory "
                "(e.g. one saved with SpeechLM.save_pretrained) or a Hugging Face repo id"
            )
        return BUILTIN
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if path.exists():
        raise ModelLoadError(f"{text} is a file; a model is a directory")
    if not isinstance(name, os.PathLike) and _HUB_ID.match(text):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text))
        except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelLoadError(
                f"no model directory at {text}, and it cannot be fetched as a Hugging Face repo id ({first})"
            ) from None
    raise ModelLoadError(f"no model directory at {text}")


def load(
    name: str | os.PathLike | None = None, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> SpeechLM:
    """Load a speech LM: one saved by `save`, or the checkpoint of an architecture of
    `voxtune.model.architectures` (detected from its config.json), checking every weight's name
    and shape against the model.

    Raises:
        ModelLoadError: the directory is missing, not a model voxtune reads, damaged, or its
            weights do not match (each missing, unexpected or misshapen key is named).
    """
    from voxtune.model.architectures import load_pretrained

    path = resolve(name)
    config_path = path / CONFIG_FILE
    try:
        if not config_path.is_file():
            return load_pretrained(path, dtype=dtype or torch.float32).to(device or "cpu").eval()
        return _load(path, config_path, device, dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as error:
        # Damaged or inconsistent files surface from transformers, safetensors or torch in
        # many forms; the caller needs one line that says which checkpoint and what.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load {path}: {first}") from None


def _load(path: Path, config_path: Path, device: Any, dtype: torch.dtype | None) -> SpeechLM:
    from transformers import AutoModelForCausalLM

    config = SpeechLMConfig.from_dict(json.loads(config_path.read_text()))
    tokenizer = _load_tokenizer(path)
    # With output_loading_info, from_pretrained returns (model, loading info).
    lm, info = cast(
        "tuple[PreTrainedModel, dict[str, Any]]",
        AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=dtype or torch.float32),
    )
    check_keys("LM", sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", [])), [])
    rows = cast(torch.nn.Embedding, lm.get_input_embeddings()).num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the LM only {rows} embeddings")
    encoder = build_encoder(config.encoder_kind, config.encoder)
    projector = Projector(
        encoder.dim,
        lm.config.hidden_size,
        stack=config.projector_stack,
        hidden=config.projector_hidden,
        norm_mid=config.projector_norm_mid,
    )
    model = SpeechLM(encoder, projector, lm, tokenizer, config)
    weights_path = path / AUDIO_WEIGHTS
    if not weights_path.is_file():
        raise ModelLoadError(f"{path} has no {AUDIO_WEIGHTS}")
    state = load_file(weights_path)
    expected = {
        f"{name}.{key}": t for name in ("encoder", "projector") for key, t in getattr(model, name).state_dict().items()
    }
    _check_state("audio", expected, state)
    for name in ("encoder", "projector"):
        prefix = f"{name}."
        getattr(model, name).load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device or "cpu").eval()


def load_encoder_weights(model: SpeechLM, name: str | os.PathLike) -> None:
    """Give `model` the trained encoder of the saved model `name` (a directory or repo id), in
    place: e.g. a new LM learning to read an encoder trained before. The encoder configs must
    match (every weight's name and shape is checked).

    Raises:
        ModelLoadError: `name` is not a voxtune model, or its encoder differs from `model`'s.
    """
    path = resolve(name)
    weights_path = path / AUDIO_WEIGHTS
    if not weights_path.is_file():
        raise ModelLoadError(f"{path} is not a voxtune model (no {AUDIO_WEIGHTS})")
    try:
        state = {k[len("encoder.") :]: v for k, v in load_file(weights_path).items() if k.startswith("encoder.")}
    except (OSError, SafetensorError) as error:
        raise ModelLoadError(f"cannot read {weights_path}: {error}") from None
    _check_state("encoder", model.encoder.state_dict(), state)
    model.encoder.load_state_dict(state)


def _load_tokenizer(path: Path) -> Any:
    """The tokenizer as it was saved. A generic fast tokenizer (what `tiny` trains) is loaded as
    such: `AutoTokenizer` would pick the model family's class, which adds tokens of its own."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    settings_path = path / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    if settings.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _check_state(part: str, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Raise `ModelLoadError` naming every weight of `state` that is missing, unexpected or of
    another shape than in `expected`."""
    misshapen = [
        f"{k} {tuple(state[k].shape)} vs {tuple(t.shape)}"
        for k, t in expected.items()
        if k in state and state[k].shape != t.shape
    ]
    check_keys(part, sorted(set(expected) - set(state)), sorted(set(state) - set(expected)), misshapen)


def check_keys(part: str, missing: list[str], unexpected: list[str], misshapen: list[str]) -> None:
    problems = [
        f"{label} {_some(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
        if keys
    ]
    if problems:
        raise ModelLoadError(f"{part} weights do not match the model: {'; '.join(problems)}")


def _some(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
