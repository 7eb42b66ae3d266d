"""voxtune: fine-tune, run and serve audio-native language models."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voxtune.model import SpeechLM

try:
    __version__ = version("voxtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def load(name: str | os.PathLike | None = None, **kwargs: Any) -> SpeechLM:
    """Load a speech LM: a directory saved by `SpeechLM.save_pretrained`, or a Hugging Face repo
    id. With no name, the built-in model. Keyword arguments: `device`, `dtype`.

    Importing torch and transformers happens here, not when voxtune is imported.
    """
    from voxtune.model.checkpoint import load as load_checkpoint

    return load_checkpoint(name, **kwargs)


__all__ = ["__version__", "load"]
