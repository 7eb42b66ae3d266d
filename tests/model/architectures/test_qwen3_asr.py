"""Qwen3-ASR read from its own checkpoint: the same numbers as its transformers class and
processor, LoRA on the LM alone, adapters and merged exports that transformers + peft load,
`voxtune train` and the OpenAI server on it. The checkpoint is a tiny random one the tests build."""

from __future__ import annotations

import harness
import pytest
import torch
from harness import clip, messages
from transformers import AutoProcessor, Qwen3ASRForConditionalGeneration

import voxtune
from voxtune.model.architectures.pretrained import PretrainedSpeechLM
from voxtune.model.architectures.tiny import tiny_checkpoint

LM = harness.lm_layers("model.language_model.layers")  # its attention and MLP layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3-ASR, saved in its own layout."""
    return tiny_checkpoint("qwen3_asr", tmp_path_factory.mktemp("qwen3-asr") / "model")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The architecture's own transformers model and processor."""
    return Qwen3ASRForConditionalGeneration.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(
        checkpoint
    )


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(model, reference):
    hf, processor = reference
    assert isinstance(model, PretrainedSpeechLM) and model.family.name == "qwen3"
    assert model.processor.audio_text == "<|audio_start|><|audio_pad|><|audio_end|>"
    audio = clip(2.3)
    chat = messages(audio)
    inputs = harness.rendered_inputs(model, processor, audio)
    assert set(inputs) >= {"input_features", "input_features_mask"} and inputs["input_features"].shape[1] == 128
    expected = harness.assert_same_as_reference(model, hf, processor.tokenizer, chat, inputs)
    harness.assert_batched_and_encoded_replies(model, chat, audio, expected)


# 0.2 s and 0.45 s: shorter than the extractor's 0.5 s minimum; 1.2345 s: not whole hops;
# 31 s: longer than the extractor's 30 s window, which its processor does not pad to.
@pytest.mark.parametrize("seconds", [0.2, 0.45, 1.0, 1.2345, 2.55, 31.0])
def test_placeholder_counts_match_the_processor_and_the_encoder(model, reference, seconds):
    hf, processor = reference
    audio = clip(seconds)
    inputs = harness.rendered_inputs(model, processor, audio)
    expected = int((inputs["input_ids"] == hf.config.audio_token_id).sum())
    embeddings, frames = harness.assert_audio_tokens(model, audio, expected)
    assert int(frames[0]) == int(inputs["input_features_mask"].sum())
    with torch.no_grad():
        rows = hf.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    assert (embeddings - rows).abs().max() <= 1e-5


def test_batched_clips_are_featurised_as_each_alone(model):
    clips = [clip(1.2345).samples, clip(0.3, seed=1).samples, clip(2.0, seed=2).samples]
    features, frames = model.featurize(clips)
    for i, samples in enumerate(clips):
        alone, count = model.featurize([samples])
        assert frames[i] == count[0] and torch.equal(features[i, :, : alone.shape[-1]], alone[0])


def test_lora_lands_on_the_lm_only_unless_the_encoder_is_asked(checkpoint):
    model = harness.assert_lora_targets(checkpoint, LM)  # the projector stays as it is
    harness.assert_lora_b_gradients(model, harness.labelled_batch(model, messages(clip(1.0))))
    tower = {f"model.audio_tower.layers.{i}.{leaf}" for i in range(2) for leaf in harness.WHISPER_ENCODER}
    harness.assert_encoder_lora(checkpoint, tower, LM)


@pytest.fixture(scope="module")
def trained(checkpoint, corpus, tmp_path_factory):
    """12 steps of LoRA on q, v and the head: the run's folder."""
    return harness.train(checkpoint, corpus, tmp_path_factory.mktemp("train"), targets=["q_proj", "v_proj", "lm_head"])


def test_training_lowers_the_loss_and_caches_the_frozen_tower(trained):
    harness.assert_trained_on_cached_features(trained)


def test_the_merged_export_and_the_adapters_load_in_transformers(checkpoint, trained):
    merged = voxtune.load(str(trained / "model"))
    audio = clip(1.5, seed=3)
    inputs = harness.rendered_inputs(merged, AutoProcessor.from_pretrained(trained / "model"), audio)
    batch = harness.prompt_batch(merged, messages(audio))
    harness.assert_exports_match(merged, batch, Qwen3ASRForConditionalGeneration, checkpoint, trained, inputs)


def test_the_openai_client_talks_to_it_through_the_server(model, checkpoint):
    harness.assert_served(model, checkpoint)


def test_transcripts_are_read_after_the_language_it_names(model):
    assert model.transcription_messages("clip.wav") == [
        {"role": "user", "content": [{"type": "audio", "audio": "clip.wav"}]}
    ]
    assert model.read_transcript("language English<asr_text>Hello there.") == ("Hello there.", None)
    # Streamed: nothing shows while the language is written, then the words as they come.
    assert [model.read_transcript(p)[0] for p in ("lang", "language Eng", "language English<asr_text>Hel")] == [
        "",
        "",
        "Hel",
    ]
