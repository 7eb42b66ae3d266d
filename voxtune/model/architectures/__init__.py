"""Audio-LLM architectures voxtune reads from their own checkpoints, beside its own format.

Each is one small module that knows how its checkpoint featurises and encodes audio, how many
placeholder tokens a clip takes, its chat markers and which class holds its weights; it returns
a `PretrainedSpeechLM`, which the engine, the trainer and the server use like any `SpeechLM`.
The architecture is detected from config.json's `model_type`, as the LM family registry
(`voxtune.model.registry`) detects text LMs.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from voxtune.model.architectures.pretrained import PretrainedSpeechLM

# model_type -> the module that loads it (imported on use: each pulls in its transformers class).
ARCHITECTURES: dict[str, str] = {
    "qwen2_audio": "voxtune.model.architectures.qwen2_audio",
    "qwen2_5_omni": "voxtune.model.architectures.qwen_omni",
    "qwen3_omni_moe": "voxtune.model.architectures.qwen_omni",
    # The Omni thinkers saved alone (voxtune's merged exports of the two above).
    "qwen2_5_omni_thinker": "voxtune.model.architectures.qwen_omni",
    "qwen3_omni_moe_thinker": "voxtune.model.architectures.qwen_omni",
    "qwen3_asr": "voxtune.model.architectures.qwen3_asr",
    "gemma4": "voxtune.model.architectures.gemma4",
    "whisper": "voxtune.model.architectures.whisper",
    "ultravox": "voxtune.model.architectures.ultravox",
    "voxtral": "voxtune.model.architectures.voxtral",
    "audioflamingo3": "voxtune.model.architectures.audio_flamingo",
    "musicflamingo": "voxtune.model.architectures.audio_flamingo",
    "glmasr": "voxtune.model.architectures.glm_asr",
}


def architecture_name(path: str | os.PathLike) -> str | None:
    """The `model_type` of the checkpoint at `path` when voxtune reads it as an architecture
    (None otherwise, or when it has no readable config.json)."""
    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return model_type if model_type in ARCHITECTURES else None


def load_pretrained(path: Path, *, dtype: torch.dtype = torch.float32) -> PretrainedSpeechLM:
    """The checkpoint at `path` as a `PretrainedSpeechLM`, through its architecture's module.

    Raises:
        ModelLoadError: no config.json, or a `model_type` no module here reads (the message
            lists the ones that are read).
    """
    from voxtune.model.architectures.pretrained import read_config
    from voxtune.model.checkpoint import CONFIG_FILE, ModelLoadError

    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a voxtune model (no {CONFIG_FILE}) nor a transformers checkpoint (no config.json)"
        )
    model_type = read_config(path).get("model_type")
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(
            f"{path / 'config.json'}: model_type {model_type!r} is not an architecture voxtune reads "
            f"(it reads its own checkpoints, with {CONFIG_FILE}, and: {known})"
        )
    return importlib.import_module(ARCHITECTURES[model_type]).load(path, dtype)


__all__ = ["ARCHITECTURES", "architecture_name", "load_pretrained"]
