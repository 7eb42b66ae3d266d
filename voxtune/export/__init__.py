"""`voxtune export`: a model, or a training run, written for the engines people serve with.

    from voxtune.export import export
    export("out/train", "ultravox", "out/export")      # merged, adapters, ultravox or gguf

The source is a model folder (voxtune's own or another architecture's) or a training run's
output folder (its `model/`, and `adapter/` when it trained LoRA). The export is written to a
temporary sibling and renamed into place, so a failed export never leaves half a folder; an
existing folder is replaced only with `overwrite`. Each export carries a model card
(`README.md`) saying what it is, how it was made, and how to run it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from voxtune.errors import InputError

FORMATS = ("merged", "adapters", "ultravox", "gguf")


class ExportError(InputError):
    """An export that cannot be made as asked."""


@dataclass
class Source:
    """What an export reads: the model folder, and the run around it when there is one."""

    model: Path
    adapters: Path | None  # peft adapters of the LM (a run that trained LoRA)
    run: Path | None


def find_source(path: str | Path) -> Source:
    """The model (and adapters) in `path`: a model folder or a training run's output folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ExportError(f"{path} is not a folder (give a model folder or a training run's output folder)")
    if _is_model(path / "model"):
        adapters = path / "adapter"
        return Source(path / "model", adapters if (adapters / "adapter_config.json").is_file() else None, path)
    if _is_model(path):
        return Source(path, None, None)
    raise ExportError(f"{path} holds no model: neither config.json / voxtune.json nor a run's model/ folder")


def _is_model(path: Path) -> bool:
    return (path / "voxtune.json").is_file() or (path / "config.json").is_file()


def export(source: str | Path, to: str, out: str | Path, *, quant: str | None = None, overwrite: bool = False) -> Path:
    """Write `source` as `to` (one of FORMATS) into the folder `out`; returns `out`.

    merged: the model with any LoRA merged, as a plain voxtune (or architecture) checkpoint.
    adapters: a run's peft adapters alone (transformers + peft load them on the base model).
    ultravox: the Hugging Face Ultravox layout vLLM serves (Whisper-encoder models).
    gguf: the LM as GGUF (`quant`: f32, f16, bf16 or q8_0; default f16) and the audio encoder
    with the projector as an mmproj GGUF, for llama.cpp (Whisper-encoder models).
    """
    from voxtune.files import WriteError, atomic_directory, reported_writes

    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r} (choose {', '.join(FORMATS)})")
    if quant is not None and to != "gguf":
        raise ExportError(f"--quant goes with --to gguf, not --to {to}")
    found = find_source(source)
    target = Path(out).expanduser().resolve()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())) and not overwrite:
        raise ExportError(f"{target} exists: pass --overwrite to replace it")
    if target == found.model.resolve() or found.model.resolve() in target.parents:
        raise ExportError(f"{target} is inside the model it exports: choose another folder")
    try:
        with reported_writes(f"the export to {target}"), atomic_directory(target) as staging:
            _write(found, to, staging, quant)
    except WriteError as error:
        raise ExportError(str(error)) from None
    return target


def _write(found: Source, to: str, staging: Path, quant: str | None) -> None:
    from voxtune.export.card import write_card

    if to == "adapters":
        if found.adapters is None:
            where = "this run" if found.run is not None else f"{found.model} (a model folder, not a training run's)"
            raise ExportError(f"--to adapters: {where} has no LoRA adapters (adapter/adapter_config.json)")
        shutil.copytree(found.adapters, staging, dirs_exist_ok=True)
        write_card(found, to, staging)
        return
    import voxtune

    model = voxtune.load(found.model)
    if to == "merged":
        model.save_pretrained(staging)
        for name in ("training.json", "eval.json"):  # how it was made, when the source says
            if (found.model / name).is_file() and not (staging / name).exists():
                shutil.copy2(found.model / name, staging / name)
    elif to == "ultravox" and getattr(model, "architecture", None) == "ultravox":
        model.save_pretrained(staging)  # an Ultravox checkpoint saves in its own layout, every part inline
    elif to == "ultravox":
        from voxtune.export.ultravox import write_ultravox

        write_ultravox(model, staging)
    else:
        from voxtune.export.gguf import write_gguf

        write_gguf(model, staging, quant or "f16")
    write_card(found, to, staging)


__all__ = ["FORMATS", "ExportError", "Source", "export", "find_source"]
