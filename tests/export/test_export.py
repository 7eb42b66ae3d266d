"""`voxtune export`: merged, adapters and the Ultravox layout, read back with the same numbers;
the model card; and one clear line for every export that cannot be made."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import voxtune
from voxtune.audio import Audio
from voxtune.config import load_config
from voxtune.export import ExportError, export
from voxtune.model import tiny
from voxtune.tags import AUDIO_TOKEN
from voxtune.train.recipe import TrainRecipe
from voxtune.train.trainer import Trainer


def _clip(samples: int, seed: int = 0) -> Audio:
    return Audio(np.random.default_rng(seed).standard_normal(samples).astype(np.float32) * 0.1, 16000)


def _logits(model, clip: Audio) -> torch.Tensor:
    messages = [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "what?"}]}]
    batch = model.processor.collate([model.processor.encode_messages(messages, add_generation_prompt=True)])
    with torch.no_grad():
        return model(batch).logits


@pytest.fixture(scope="module")
def whisper_model(tmp_path_factory):
    """A saved tiny model with a Whisper encoder and the mid-norm projector (the default)."""
    path = tmp_path_factory.mktemp("whisper-model") / "model"
    tiny("qwen2", "whisper", seed=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A 3-step LoRA run from a saved tiny Whisper-encoder model (its `base/` beside the run's
    folder): the run's output folder."""
    out = tmp_path_factory.mktemp("run")
    tiny("llama", "whisper", seed=6, hidden=32).save_pretrained(out.parent / f"{out.name}-base")
    recipe = load_config(
        TrainRecipe,
        {
            "model": {"load": str(out.parent / f"{out.name}-base")},
            "data": {"train": [str(corpus / "train.jsonl")]},
            "train": {"max_steps": 3, "max_tokens": 1500, "log_every": 1},
            "optim": {"lr": 1e-2, "warmup_steps": 1},
            "eval": {"every": 100},
            "output": {"dir": str(out), "save_every": 100},
        },
    )
    trainer = Trainer(recipe, log=lambda _: None)
    trainer.fit()
    trainer.export()
    return out


# ---- ultravox -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_mid", [True, False])
def test_the_ultravox_layout_reads_back_with_identical_logits(tmp_path, norm_mid):
    model = tiny("llama", "whisper", seed=2, projector_norm_mid=norm_mid)
    model.save_pretrained(tmp_path / "model")
    out = export(tmp_path / "model", "ultravox", tmp_path / "ultravox")
    again = voxtune.load(out)
    assert again.architecture == "ultravox"
    for samples in (16000, 16080, 23456):  # whole hops and not: both pad to a whole hop, as Ultravox's processor does
        assert (_logits(model, _clip(samples)) - _logits(again, _clip(samples))).abs().max() <= 1e-5
    messages = [{"role": "user", "content": [{"type": "audio", "audio": _clip(20000, 3)}]}]
    assert again.generate(messages, max_new_tokens=8) == model.generate(messages, max_new_tokens=8)


def test_the_ultravox_config_and_names_are_what_vllm_reads(whisper_model, tmp_path):
    model = voxtune.load(whisper_model)
    out = export(whisper_model, "ultravox", tmp_path / "ultravox")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ultravox" and config["architectures"] == ["UltravoxModel"]
    assert config["projector_ln_mid"] is True and config["projector_act"] == "swiglu"
    assert config["stack_factor"] == model.config.projector_stack
    assert config["hidden_size"] == 2 * model.config.projector_hidden
    assert config["text_config"]["model_type"] == "qwen2" and config["audio_config"]["model_type"] == "whisper"
    assert "whisper" in config["audio_config"]["_name_or_path"]  # Ultravox's code then runs the unpadded encoder
    tokenizer_vocab = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert {t["content"]: t["id"] for t in tokenizer_vocab}[AUDIO_TOKEN] == config["audio_token_index"]
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    projector = {n for n in names if n.startswith("multi_modal_projector.")}
    assert projector == {f"multi_modal_projector.{p}.weight" for p in ("ln_pre", "linear_1", "ln_mid", "linear_2")}
    tower = {n.split(".", 1)[1] for n in names if n.startswith("audio_tower.")}
    layer = {
        f"layers.0.{p}.{w}"
        for p in (
            "self_attn.q_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
            "self_attn_layer_norm",
            "final_layer_norm",
        )
        for w in ("weight", "bias")
    }
    assert (
        layer
        | {
            "layers.0.self_attn.k_proj.weight",
            "conv1.weight",
            "conv2.bias",
            "embed_positions.weight",
            "layer_norm.weight",
        }
        <= tower
    )
    lm = {n.split(".", 1)[1] for n in names if n.startswith("language_model.")}
    assert lm == set(model.lm.state_dict())
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["auto_map"]["AutoProcessor"].endswith("ultravox_processing.UltravoxProcessor")


def test_streaming_encoder_models_refuse_the_engine_layouts(tmp_path):
    tiny("llama", "streaming").save_pretrained(tmp_path / "model")
    for to in ("ultravox", "gguf"):
        with pytest.raises(ExportError, match="streaming encoder has no counterpart in vLLM or llama.cpp"):
            export(tmp_path / "model", to, tmp_path / to)
        assert not (tmp_path / to).exists()  # nothing half-written


# ---- merged and adapters ------------------------------------------------------------------------------


def test_a_run_exports_merged_and_adapters_with_the_runs_numbers(run, tmp_path):
    trained = voxtune.load(run / "model")
    merged = voxtune.load(export(run, "merged", tmp_path / "merged"))
    clip = _clip(20000, 5)
    assert torch.equal(_logits(trained, clip), _logits(merged, clip))
    assert (tmp_path / "merged" / "training.json").is_file()
    adapters = export(run, "adapters", tmp_path / "adapters")
    assert (adapters / "adapter_config.json").is_file()
    # transformers + peft alone: the base LM with the adapters computes what the merged LM does.
    base = AutoModelForCausalLM.from_pretrained(run.parent / f"{run.name}-base")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, adapters)(input_ids=ids).logits
        expected = merged.lm(input_ids=ids).logits
    assert (adapted - expected).abs().max() <= 1e-5


def test_the_card_says_what_how_and_how_to_run(run, tmp_path):
    card = (export(run, "ultravox", tmp_path / "u") / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "## How it was made" in card and "Method: lora, 3 steps" in card and "train.jsonl" in card
    assert "vllm serve" in card and "--trust-remote-code" in card
    adapters = (export(run, "adapters", tmp_path / "a") / "README.md").read_text()
    assert "library_name: peft" in adapters and "PeftModel.from_pretrained" in adapters


# ---- bad input ----------------------------------------------------------------------------------------


def test_an_existing_folder_is_replaced_only_when_asked(whisper_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists: pass --overwrite"):
        export(whisper_model, "merged", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    export(whisper_model, "merged", tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "voxtune.json").is_file()


@pytest.mark.parametrize(
    "args, words",
    [
        (["{model}", "--to", "onnx", "--out", "{out}"], "invalid choice: 'onnx'"),
        (["{empty}", "--to", "merged", "--out", "{out}"], "holds no model"),
        (["{model}", "--to", "adapters", "--out", "{out}"], "has no LoRA adapters"),
        (["{model}", "--to", "merged", "--quant", "q8_0", "--out", "{out}"], "--quant goes with --to gguf"),
        (["{model}", "--to", "merged", "--out", "{out}", "--private"], "--private goes with --push-to-hub"),
        (["{broken}", "--to", "ultravox", "--out", "{out}"], "model.safetensors"),
    ],
)
def test_bad_exports_are_one_line(whisper_model, tmp_path, cli, args, words):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    tiny("llama", "whisper").save_pretrained(broken)
    (broken / "model.safetensors").unlink()
    fill = {"model": whisper_model, "out": tmp_path / "out", "empty": tmp_path / "empty", "broken": broken}
    done = cli("export", *(a.format(**fill) for a in args))
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(whisper_model, tmp_path):
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # the weights are larger

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "voxtune.cli",
            "export",
            str(whisper_model),
            "--to",
            "ultravox",
            "--out",
            str(tmp_path / "out"),
        ],
        preexec_fn=limited,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("voxtune: error: cannot write the export to") and done.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_other_architectures_export_merged_and_ultravox_checkpoints_stay_ultravox(tmp_path):
    from voxtune.model.architectures.tiny import tiny_checkpoint

    ultravox = tiny_checkpoint("ultravox", tmp_path / "ultravox")
    again = voxtune.load(export(ultravox, "ultravox", tmp_path / "u"))
    original = voxtune.load(ultravox)
    assert again.architecture == "ultravox"
    assert torch.equal(_logits(original, _clip(16000)), _logits(again, _clip(16000)))
    qwen = tiny_checkpoint("qwen2_audio", tmp_path / "qwen", seconds=2)
    with pytest.raises(ExportError, match="this is a qwen2_audio checkpoint"):
        export(qwen, "gguf", tmp_path / "g")
    assert voxtune.load(export(qwen, "merged", tmp_path / "m")).architecture == "qwen2_audio"
