"""The model card (`README.md`) every export carries: what the folder holds, the model it was
made from, how it was trained and evaluated (from `training.json` and `eval.json` when the
source has them), and the command lines that run it in voxtune, vLLM, llama.cpp or peft."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voxtune.export import Source

HOLDS = {
    "merged": "the model with its LoRA adapters merged in, as a plain checkpoint",
    "adapters": "the LoRA adapters alone, in peft's format",
    "ultravox": "the model in the Hugging Face Ultravox layout (Whisper encoder, projector, LM), as vLLM serves it",
    "gguf": "the LM as GGUF and the audio encoder with its projector as an mmproj GGUF, for llama.cpp",
}


def write_card(source: Source, to: str, directory: Path) -> None:
    """Write `directory/README.md` for an export of `source` as `to`."""
    (directory / "README.md").write_text(model_card(source, to, directory))


def model_card(source: Source, to: str, directory: Path) -> str:
    """The card's text (front matter for the Hub, then Markdown)."""
    training = _read(source.model / "training.json")
    evaluation = _read(source.model / "eval.json")
    base = _base_model(training)
    name = (source.run or source.model).resolve().name
    front = [
        "---",
        "library_name: " + ("peft" if to == "adapters" else "transformers"),
        "tags: [voxtune, speech, audio, " + to + "]",
    ]
    if base:
        front.append(f"base_model: {base}")
    lines = [
        *front,
        "---",
        "",
        f"# {name} ({to})",
        "",
        f"This folder holds {HOLDS[to]}. It was exported by voxtune (`voxtune export {name} --to {to}`).",
        "",
    ]
    lines += _made(training, base)
    lines += _evaluated(evaluation)
    lines += ["## Run it", "", *_usage(to, directory), ""]
    return "\n".join(lines)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _base_model(training: dict[str, Any] | None) -> str | None:
    """The model a run started from, when it was one with a name (not built in code)."""
    if not training:
        return None
    model = training.get("recipe", {}).get("model", {})
    return model.get("load") or model.get("lm")


def _made(training: dict[str, Any] | None, base: str | None) -> list[str]:
    if not training:
        return ["## How it was made", "", "The source folder has no training record (`training.json`).", ""]
    recipe = training.get("recipe", {})
    data = recipe.get("data", {})
    train = recipe.get("train", {})
    lines = ["## How it was made", ""]
    lines.append(f"- Base model: {base or 'built in code (' + json.dumps(recipe.get('model', {}).get('tiny')) + ')'}")
    lines.append(
        f"- Data: {', '.join(map(str, data.get('train', []))) or 'see the recipe'}"
        + (f" (synthesised by the data recipe {data['synth']})" if data.get("synth") else "")
    )
    lines.append(
        f"- Method: {train.get('method', '?')}, {training.get('steps', '?')} steps, seed {training.get('seed', '?')}, "
        f"{training.get('training_seconds', '?')} s on {training.get('machine', '?')}"
    )
    lines.append(
        f"- voxtune {training.get('voxtune_version', '?')}; the whole recipe is in `training.json` "
        "when the export carries it"
    )
    last = training.get("last_evaluation")
    if last:
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items())
        lines.append(f"- Last evaluation during training: {shown}")
    return [*lines, ""]


def _evaluated(evaluation: dict[str, Any] | None) -> list[str]:
    if not evaluation:
        return []
    lines = [
        "## Evaluation (`voxtune eval`)",
        "",
        f"Suite {evaluation.get('suite')}, {evaluation.get('date')}, {evaluation.get('machine')}.",
        "",
        "| measure | value |",
        "| --- | --- |",
    ]
    for key, value in evaluation.items():
        if isinstance(value, float):
            lines.append(f"| {key} | {value:.4g} |")
    return [*lines, ""]


def _usage(to: str, directory: Path) -> list[str]:
    here = directory.name if directory.name and not directory.name.startswith(".") else "THIS_FOLDER"
    if to == "merged":
        return [
            "```bash",
            f"voxtune serve --model {here}        # the OpenAI audio APIs",
            f"voxtune chat --model {here} --audio question.wav",
            "```",
        ]
    if to == "adapters":
        return [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "base = AutoModelForCausalLM.from_pretrained(BASE)  # the LM the adapters were trained on",
            f'model = PeftModel.from_pretrained(base, "{here}")',
            "```",
        ]
    if to == "ultravox":
        return [
            "```bash",
            f"vllm serve {here} --trust-remote-code   # the processor is Ultravox's remote code",
            f"voxtune serve --model {here}",
            "```",
        ]
    return [
        "```bash",
        f"llama-server -m {here}/model.gguf --mmproj {here}/mmproj.gguf",
        f"llama-mtmd-cli -m {here}/model.gguf --mmproj {here}/mmproj.gguf "
        '--audio question.wav -p "Answer the question."',
        "```",
        "",
        "llama.cpp pads every clip to a 30 s window and reads it unmasked, so its numbers differ a little from "
        "voxtune's and vLLM's.",
    ]
