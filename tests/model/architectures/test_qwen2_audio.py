"""Qwen2-Audio read from its own checkpoint: the same numbers as its transformers class, LoRA
on the LM alone, adapters and merged exports that transformers + peft load, `voxtune train`
and the OpenAI server on it. The checkpoint is a tiny random one the tests build and save."""

from __future__ import annotations

import json

import harness
import pytest
import torch
from harness import clip, messages
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

import voxtune
from voxtune.cli import main
from voxtune.model import ModelLoadError
from voxtune.model.architectures.pretrained import PretrainedSpeechLM
from voxtune.model.architectures.tiny import tiny_checkpoint
from voxtune.model.quantize import dequantized_weight, quantize_linears
from voxtune.train.model_setup import TrainError, prepare_trainable
from voxtune.train.recipe import TrainSection

LM = harness.lm_layers("model.language_model.layers")  # its attention and MLP layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen2-Audio with a 6 s encoder window, saved in its own layout."""
    return tiny_checkpoint("qwen2_audio", tmp_path_factory.mktemp("qwen2-audio") / "model", seconds=6)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The architecture's own transformers model and processor."""
    return Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(
        checkpoint
    )


def _reference_inputs(model, processor, audio, text: str = "What is said?") -> dict:
    """What the architecture's own processor makes of the chat voxtune renders."""
    return harness.rendered_inputs(model, processor, audio, text, sampling_rate=16000)


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(model, reference):
    hf, processor = reference
    assert isinstance(model, PretrainedSpeechLM) and model.family.name == "qwen2"
    audio = clip(2.3)
    chat = messages(audio)
    inputs = _reference_inputs(model, processor, audio)
    expected = harness.assert_same_as_reference(model, hf, processor.tokenizer, chat, inputs)
    harness.assert_batched_and_encoded_replies(model, chat, audio, expected)


@pytest.mark.parametrize("seconds", [0.2, 1.00003, 2.5537, 6.0])
def test_placeholder_counts_match_the_processor_and_the_encoder(model, reference, seconds):
    hf, processor = reference
    audio = clip(seconds)
    inputs = _reference_inputs(model, processor, audio)
    harness.assert_audio_tokens(model, audio, int((inputs["input_ids"] == hf.config.audio_token_id).sum()))


def test_lora_lands_on_the_lm_only_unless_the_encoder_is_asked(checkpoint):
    model = harness.assert_lora_targets(checkpoint, LM)  # the projector stays as it is
    harness.assert_lora_b_gradients(model, harness.labelled_batch(model, messages(clip(1.0))))
    tower = {f"model.audio_tower.layers.{i}.{leaf}" for i in range(2) for leaf in harness.WHISPER_ENCODER}
    harness.assert_encoder_lora(checkpoint, tower, LM)


def test_missing_lora_targets_name_the_field(checkpoint):
    model = voxtune.load(str(checkpoint))
    with pytest.raises(TrainError, match=r"train.lora.targets: the model has no modules named qkv_proj"):
        prepare_trainable(model, TrainSection(method="lora", lora={"targets": ["qkv_proj"]}))


@pytest.fixture(scope="module")
def trained(checkpoint, corpus, tmp_path_factory):
    """12 steps of LoRA on q, v and the head: the run's folder."""
    return harness.train(checkpoint, corpus, tmp_path_factory.mktemp("train"), targets=["q_proj", "v_proj", "lm_head"])


def test_training_lowers_the_loss_and_caches_the_frozen_tower(trained):
    harness.assert_trained_on_cached_features(trained)


def test_the_merged_export_and_the_adapters_load_in_transformers(checkpoint, trained):
    merged = voxtune.load(str(trained / "model"))
    audio = clip(1.5, seed=3)
    inputs = _reference_inputs(merged, AutoProcessor.from_pretrained(trained / "model"), audio)
    batch = harness.prompt_batch(merged, messages(audio))
    harness.assert_exports_match(merged, batch, Qwen2AudioForConditionalGeneration, checkpoint, trained, inputs)


def test_a_full_fine_tune_exports_what_its_class_loads(checkpoint, corpus, tmp_path):
    run = harness.train(checkpoint, corpus, tmp_path, method="full", lr=3e-3, max_steps=10)
    harness.assert_loss_fell(run)
    assert not (run / "adapter").exists()  # no adapters: every LM weight trained
    merged = voxtune.load(str(run / "model"))
    audio = clip(1.5, seed=3)
    inputs = _reference_inputs(merged, AutoProcessor.from_pretrained(run / "model"), audio)
    with torch.no_grad():
        ours = merged(harness.prompt_batch(merged, harness.messages(audio))).logits
        theirs = Qwen2AudioForConditionalGeneration.from_pretrained(run / "model").eval()(**inputs).logits
        before = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint).eval()(**inputs).logits
    assert (ours - theirs).abs().max() <= 1e-4 and (ours - before).abs().max() > 1e-3


def test_qlora_trains_on_its_lm_in_4_bits_and_exports_full_precision(checkpoint, corpus, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA's 4-bit layers need bitsandbytes")
    run = harness.train(checkpoint, corpus, tmp_path, method="qlora", targets=["q_proj", "v_proj", "lm_head"])
    harness.assert_loss_fell(run)
    assert (run / "adapter" / "adapter_config.json").is_file()
    exported = Qwen2AudioForConditionalGeneration.from_pretrained(run / "model").state_dict()
    base = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint)
    # A layer without adapters comes back as its 4-bit weights dequantised, so the export
    # computes what training did; the audio tower was never quantised.
    layer = torch.nn.Sequential(base.model.language_model.layers[0].self_attn.o_proj)
    quantize_linears(layer)
    assert torch.equal(exported["model.language_model.layers.0.self_attn.o_proj.weight"], dequantized_weight(layer[0]))
    tower = base.model.audio_tower.layers[0].self_attn.q_proj.weight
    assert torch.equal(exported["model.audio_tower.layers.0.self_attn.q_proj.weight"], tower)
    merged = voxtune.load(str(run / "model"))
    audio = clip(1.5, seed=3)
    inputs = _reference_inputs(merged, AutoProcessor.from_pretrained(run / "model"), audio)
    with torch.no_grad():
        ours = merged(harness.prompt_batch(merged, messages(audio))).logits
        theirs = Qwen2AudioForConditionalGeneration.from_pretrained(run / "model").eval()(**inputs).logits
    assert (ours - theirs).abs().max() <= 1e-4


def test_the_openai_client_talks_to_it_through_the_server(model, checkpoint):
    harness.assert_served(model, checkpoint)


def test_unreadable_checkpoints_say_what_is_wrong(checkpoint, tmp_path):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "brand_new_audio_llm"}))
    with pytest.raises(
        ModelLoadError, match=r"model_type 'brand_new_audio_llm' is not an architecture voxtune reads.*qwen2_audio"
    ):
        voxtune.load(str(unknown))
    bare = harness.copy_files(checkpoint, tmp_path / "bare", harness.WEIGHTS_ONLY)
    with pytest.raises(
        ModelLoadError, match=r"has no preprocessor_config.json: the checkpoint is missing its processor files"
    ):
        voxtune.load(str(bare))
    assert main(["transcribe", "--model", str(bare), str(tmp_path / "none.wav")]) != 0
