"""Checkpoints: round trip, the LM readable by transformers alone, strict keys, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import voxtune
from voxtune.model import ModelLoadError, tiny


def _logits(model, clip) -> torch.Tensor:
    messages = [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "?"}]}]
    with torch.no_grad():
        return model(model.processor.collate([model.processor.encode_messages(messages)])).logits


@pytest.mark.parametrize("family, encoder", [("llama", "streaming"), ("qwen2", "whisper"), ("gemma3_text", "whisper")])
def test_round_trip_gives_identical_outputs(tmp_path, make_clip, family, encoder):
    model = tiny(family, encoder, seed=3)
    model.save_pretrained(tmp_path / "model")
    loaded = voxtune.load(tmp_path / "model")
    clip = make_clip(1.1)
    assert torch.equal(_logits(model, clip), _logits(loaded, clip))
    messages = [{"role": "user", "content": [{"type": "audio", "audio": clip}]}]
    assert loaded.generate(messages, max_new_tokens=10) == model.generate(messages, max_new_tokens=10)
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template
    assert loaded.config == model.config


def test_the_projector_norm_sits_mid_for_whisper_models_and_older_checkpoints_keep_theirs(tmp_path, make_clip):
    whisper, streaming = tiny("llama", "whisper", seed=1), tiny("llama", "streaming", seed=1)
    assert whisper.config.projector_norm_mid and whisper.projector.norm_out is None
    assert not streaming.config.projector_norm_mid and streaming.projector.norm_mid is None
    # A checkpoint saved before the choice existed has no such key: its norm is after the MLP.
    old = tiny("llama", "whisper", seed=1, projector_norm_mid=False)
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "voxtune.json").read_text())
    del config["projector_norm_mid"]
    (tmp_path / "voxtune.json").write_text(json.dumps(config))
    loaded = voxtune.load(tmp_path)
    assert loaded.projector.norm_out is not None and loaded.projector.norm_mid is None
    clip = make_clip(0.9)
    assert torch.equal(_logits(old, clip), _logits(loaded, clip))


def test_the_lm_part_is_a_plain_transformers_checkpoint(tmp_path):
    model = tiny("qwen2", "streaming")
    model.save_pretrained(tmp_path)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, model.lm(input_ids=ids).logits)


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path):
    first, second = tiny("llama", "streaming", seed=1), tiny("llama", "streaming", seed=2)
    first.save_pretrained(tmp_path / "m")
    second.save_pretrained(tmp_path / "m")
    loaded = voxtune.load(tmp_path / "m")
    assert torch.equal(loaded.projector.down.weight, second.projector.down.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folders left behind


@pytest.fixture
def saved(tmp_path):
    tiny("llama", "streaming").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_a_missing_audio_weight_is_named(saved):
    state = load_file(saved / "audio.safetensors")
    del state["projector.down.weight"]
    save_file(state, saved / "audio.safetensors")
    with pytest.raises(ModelLoadError, match="missing projector.down.weight"):
        voxtune.load(saved)


def test_an_unexpected_audio_weight_is_named(saved):
    state = load_file(saved / "audio.safetensors")
    state["projector.extra.bias"] = torch.zeros(3)
    save_file(state, saved / "audio.safetensors")
    with pytest.raises(ModelLoadError, match="unexpected projector.extra.bias"):
        voxtune.load(saved)


def test_a_missing_lm_weight_is_named(saved):
    state = load_file(saved / "model.safetensors")
    name = next(k for k in state if "layers.1.mlp.down_proj" in k)
    del state[name]
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="layers.1.mlp.down_proj"):
        voxtune.load(saved)


def test_bad_names_and_configs(tmp_path, saved, monkeypatch):
    from voxtune.model import checkpoint

    monkeypatch.setattr(checkpoint, "BUILTIN", tmp_path / "not-installed")  # a package without its weights
    with pytest.raises(ModelLoadError, match="built-in model is not installed"):
        voxtune.load()
    with pytest.raises(ModelLoadError, match="no model directory"):
        voxtune.load(tmp_path / "nothing-here")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        voxtune.load(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a voxtune model"):
        voxtune.load(tmp_path / "empty")
    config = json.loads((saved / "voxtune.json").read_text())
    (saved / "voxtune.json").write_text(json.dumps(config | {"surprise": 1}))
    with pytest.raises(ModelLoadError, match="surprise"):
        voxtune.load(saved)


def test_saving_never_deletes_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="will not save over"):
        tiny("llama", "streaming").save_pretrained(tmp_path / "work")
    assert (tmp_path / "work" / "notes.txt").read_text() == "keep me"
    tiny("llama", "streaming").save_pretrained(tmp_path / "fresh")
    assert (tmp_path / "fresh").stat().st_mode & 0o077  # not private to its owner, as mkdtemp would make it


@pytest.mark.parametrize(
    "damage", ["truncated-audio", "truncated-lm", "encoder-width", "vocab-size", "no-tokenizer", "wrong-kind"]
)
def test_damaged_checkpoints_give_one_clear_error(saved, damage):
    if damage == "truncated-audio":
        data = (saved / "audio.safetensors").read_bytes()
        (saved / "audio.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "truncated-lm":
        data = (saved / "model.safetensors").read_bytes()
        (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage in ("encoder-width", "wrong-kind"):
        config = json.loads((saved / "voxtune.json").read_text())
        if damage == "encoder-width":
            config["encoder"]["dim"] = 48
        else:
            config["encoder_kind"] = "conformer"
        (saved / "voxtune.json").write_text(json.dumps(config))
    elif damage == "vocab-size":
        config = json.loads((saved / "config.json").read_text())
        config["vocab_size"] += 7
        (saved / "config.json").write_text(json.dumps(config))
    else:
        (saved / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError) as raised:
        voxtune.load(saved)
    message = str(raised.value)
    assert "\n" not in message
    assert str(saved) in message or "weights do not match" in message


def test_half_precision_weights_ship_at_half_the_size_and_load_back_exactly(tmp_path):
    """An encoder whose weights came in float16 (Whisper's) is stored in float16; weights that
    float16 cannot hold exactly (a trained projector) stay float32. Loading gives the same model."""
    from safetensors import safe_open

    model = tiny(encoder="whisper")
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.copy_(parameter.half().float())
    model.save_pretrained(tmp_path / "m")
    with safe_open(tmp_path / "m" / "audio.safetensors", "pt") as weights:
        dtypes = {key: weights.get_tensor(key).dtype for key in weights.keys()}
    assert dtypes["encoder.conv1.weight"] == torch.float16
    assert dtypes["projector.gate_up.weight"] == torch.float32
    loaded = voxtune.load(tmp_path / "m")
    for name in ("encoder", "projector"):
        for key, value in getattr(model, name).state_dict().items():
            restored = getattr(loaded, name).state_dict()[key]
            assert restored.dtype == value.dtype and torch.equal(restored, value), key
