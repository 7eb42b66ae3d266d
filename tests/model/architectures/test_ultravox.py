"""Ultravox read natively from its Hub layout (no remote code): the same numbers as the layout
defines them (Whisper encoder, the stacking SwiGLU projector written out here from Ultravox's
definition, the LM as transformers runs it), both projector layouts, parts named by id, LoRA
on the LM with adapters under Ultravox's own names, `voxtune train` and the server."""

from __future__ import annotations

import json
import math

import harness
import pytest
import torch
import torch.nn.functional as F
from harness import clip, messages
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, WhisperConfig, WhisperFeatureExtractor

import voxtune
from voxtune.audio import Audio, encode
from voxtune.model.architectures.tiny import tiny_checkpoint
from voxtune.model.whisper_encoder import load_whisper_encoder
from voxtune.train.model_setup import prepare_trainable
from voxtune.train.recipe import TrainSection


@pytest.fixture(scope="module", params=[True, False], ids=["v0.5-ln-mid", "v0.4-ln-post"])
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint("ultravox", tmp_path_factory.mktemp("ultravox") / "model", ln_mid=request.param)


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _layout_lm(config: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The LM as transformers builds it from the layout's text_config, with the layout's weights."""
    text = dict(config["text_config"])
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
    lm.load_state_dict(
        {k[len("language_model.") :]: v for k, v in state.items() if k.startswith("language_model.")}, strict=True
    )
    lm.tie_weights()
    return lm


def _reference_logits(path, input_ids: list[int], sound: Audio) -> torch.Tensor:
    """The layout's own arithmetic: Whisper encoder, then stack k frames (time-major, zero-padded)
    -> ln_pre -> linear_1 -> silu(second half) * first half -> ln_mid -> linear_2 -> ln_post, into
    the LM's embeddings at the audio token's positions."""
    config = json.loads((path / "config.json").read_text())
    state = load_file(path / "model.safetensors")
    tower = load_whisper_encoder(
        {k[len("audio_tower.") :]: v for k, v in state.items() if k.startswith("audio_tower.")},
        WhisperConfig.from_dict(config["audio_config"]),
    )
    lm = _layout_lm(config, state).eval()
    p = {k[len("multi_modal_projector.") :]: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
    features = WhisperFeatureExtractor.from_pretrained(path)(
        sound.samples, sampling_rate=16000, return_tensors="pt", padding="longest", pad_to_multiple_of=160
    ).input_features
    with torch.no_grad():
        hidden, _ = tower(features)  # [1, T', D]
        k = config["stack_factor"]
        t = hidden.shape[1]
        stacked = F.pad(hidden, (0, 0, 0, -t % k)).reshape(1, math.ceil(t / k), k * hidden.shape[-1])
        x = F.linear(_rms(stacked, p["ln_pre.weight"]), p["linear_1.weight"])
        x = x[..., : x.shape[-1] // 2] * F.silu(x[..., x.shape[-1] // 2 :])
        x = _rms(x, p["ln_mid.weight"]) if "ln_mid.weight" in p else x
        x = F.linear(x, p["linear_2.weight"])
        audio = _rms(x, p["ln_post.weight"]) if "ln_post.weight" in p else x
        ids = torch.tensor([input_ids])
        where = ids == config["audio_token_index"]
        embeddings = lm.get_input_embeddings()(ids.masked_fill(where, 0))
        embeddings[where] = audio[0]
        return lm(inputs_embeds=embeddings).logits


def test_same_logits_as_the_layout_defines_and_token_counts(model, checkpoint):
    audio = clip(2.30037)  # 36805.9 samples: a partial last hop
    example = model.processor.encode_messages(messages(audio), add_generation_prompt=True)
    audio_id = json.loads((checkpoint / "config.json").read_text())["audio_token_index"]
    count = example.input_ids.count(audio_id)
    stack = json.loads((checkpoint / "config.json").read_text())["stack_factor"]
    # Ultravox's processor: ceil(mel frames / (2 * stack)), the frames of the clip padded to whole hops.
    assert count == math.ceil(math.ceil(len(audio) / 160) / (2 * stack)) == model.audio_tokens(len(audio))
    with torch.no_grad():
        ours = model(model.processor.collate([example])).logits
    assert (ours - _reference_logits(checkpoint, example.input_ids, audio)).abs().max() <= 1e-4
    other = messages(clip(0.7, 1), "And this?")
    assert model.generate([messages(audio), other], max_new_tokens=6) == [
        model.generate(messages(audio), max_new_tokens=6),
        model.generate(other, max_new_tokens=6),
    ]


def test_parts_named_by_id_load_the_same(model, checkpoint, tmp_path):
    """v0.4 releases carry the projector only and name the encoder and the LM by id."""
    state = load_file(checkpoint / "model.safetensors")
    config = json.loads((checkpoint / "config.json").read_text())
    _layout_lm(config, state).save_pretrained(tmp_path / "lm")
    processor_files = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja")
    slim = harness.copy_files(checkpoint, tmp_path / "slim", processor_files)
    save_file({k: v for k, v in state.items() if not k.startswith("language_model.")}, slim / "model.safetensors")
    (slim / "config.json").write_text(
        json.dumps({**{k: v for k, v in config.items() if k != "text_config"}, "text_model_id": str(tmp_path / "lm")})
    )
    chat = messages(clip(1.1, 2))
    assert voxtune.load(str(slim)).generate(chat, max_new_tokens=6) == model.generate(chat, max_new_tokens=6)


def test_lora_on_the_lm_is_named_as_ultravox_names_it(checkpoint, tmp_path):
    model = voxtune.load(str(checkpoint))
    prepare_trainable(model, TrainSection(method="lora", lora={"targets": ["q_proj", "v_proj"]}))
    assert harness.targeted(model) == {
        f"language_model.model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")
    }
    model.save_adapters(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.language_model.model.layers.") for k in keys)


@pytest.fixture(scope="module")
def trained(checkpoint, corpus, tmp_path_factory):
    """12 steps of LoRA on the LM (its default targets) and of the projector: the run's folder."""
    out = tmp_path_factory.mktemp("train")
    return harness.train(checkpoint, corpus, out, max_tokens=3000, lr=1e-2, train_projector=True)


def test_training_lowers_the_loss_and_saves_an_ultravox(trained):
    harness.assert_loss_fell(trained, window=3)
    assert json.loads((trained / "model" / "config.json").read_text())["model_type"] == "ultravox"


def test_the_trained_model_serves_its_replies(trained):
    model = voxtune.load(str(trained / "model"))
    expected = model.generate(messages(clip(1.0, 5), "Hi"), max_new_tokens=5)
    assert harness.ask_server(model, trained / "model", encode(clip(1.0, 5), "wav"), max_tokens=5).reply == expected
