"""GLM-ASR read from its own checkpoint: the same numbers as its transformers class and
processor (clips longer than a window included), LoRA on the LM alone, adapters and merged
exports that transformers + peft load, `voxtune train` and the OpenAI server on it. The
checkpoint is a tiny random one with a 2 s window (200 frames: 25 tokens), built here."""

from __future__ import annotations

import harness
import pytest
import torch
from harness import clip, messages
from transformers import AutoProcessor, GlmAsrForConditionalGeneration

import voxtune
from voxtune.errors import InputError
from voxtune.model.architectures.pretrained import PretrainedSpeechLM
from voxtune.model.architectures.tiny import tiny_checkpoint
from voxtune.train.model_setup import prepare_trainable
from voxtune.train.recipe import TrainSection

LM = harness.lm_layers("model.language_model.layers")  # its attention and MLP layers
# Its encoder layers' linear layers (o_proj, and the MLP's under mlp., unlike Whisper's).
ENCODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random GLM-ASR with a 2 s window, saved in its own layout."""
    return tiny_checkpoint("glmasr", tmp_path_factory.mktemp("glm-asr") / "model", seconds=2, init_std=0.1)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The architecture's own transformers model and processor."""
    return GlmAsrForConditionalGeneration.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(model, reference):
    hf, processor = reference
    assert isinstance(model, PretrainedSpeechLM) and model.family.name == "glm4"
    assert model.processor.audio_text == "<|begin_of_audio|><|pad|><|end_of_audio|><|user|>\n"
    audio = clip(4.5)  # three 2 s windows
    chat = messages(audio)
    inputs = harness.templated_inputs(processor, audio)
    assert inputs["input_features"].shape == (3, 128, 200)
    expected = harness.assert_same_as_reference(model, hf, processor.tokenizer, chat, inputs)
    # Batched: with a clip of other window counts.
    harness.assert_batched_and_encoded_replies(model, chat, audio, expected)


# 1.23457 s: not whole hops; 2.0001 s: a second window of one frame (no token); 3.1 s and
# 4.5 s: two and three windows, the last ones partial.
@pytest.mark.parametrize("seconds", [0.2, 1.0, 1.23457, 2.0001, 3.1, 4.5])
def test_placeholder_counts_match_the_processor_and_the_encoder(model, reference, seconds):
    hf, processor = reference
    audio = clip(seconds)
    inputs = harness.templated_inputs(processor, audio)
    expected = int((inputs["input_ids"] == hf.config.audio_token_id).sum())
    embeddings, frames = harness.assert_audio_tokens(model, audio, expected)
    assert int(frames[0]) == int(inputs["input_features_mask"].sum())
    with torch.no_grad():
        rows = hf.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    assert (embeddings - rows).abs().max() <= 1e-5


def test_transcripts_are_asked_with_the_processors_prompt(model, reference):
    processor = reference[1]
    (turn,) = model.transcription_messages(clip(1.0))
    assert turn["content"][0]["type"] == "audio"  # as apply_transcription_request lays it out
    assert turn["content"][1] == {"type": "text", "text": processor.default_transcription_prompt}
    assert model.read_transcript(" the words \n") == ("the words", None)


def test_lora_lands_on_the_lm_only_unless_the_encoder_is_asked(checkpoint):
    model = harness.assert_lora_targets(checkpoint, LM)  # the projector stays as it is
    harness.assert_lora_b_gradients(model, harness.labelled_batch(model, messages(clip(1.0))))
    tower = {f"model.audio_tower.layers.{i}.{leaf}" for i in range(2) for leaf in ENCODER}
    harness.assert_encoder_lora(checkpoint, tower, LM)


def test_replies_are_labelled_with_the_turn_closing_stop_token(model):
    """GLM-4 writes nothing after a reply; the next turn's `<|user|>` closes it, and generation
    stops there: the labels must teach it, or a fine-tune never learns to stop."""
    tokenizer, processor = model.processor.tokenizer, model.processor
    stop = tokenizer.convert_tokens_to_ids("<|user|>")
    turns = messages(clip(1.0)) + [{"role": "assistant", "content": "one"}]
    last = processor.encode_messages(turns, with_labels=True)
    trained = [t for t in last.labels if t != -100]
    assert tokenizer.decode(trained[:-1]).strip() == "one" and trained[-1] == stop
    both = processor.encode_messages(
        turns + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "two"}], with_labels=True
    )
    trained = [t for t in both.labels if t != -100]
    assert trained.count(stop) == 2 and trained[-1] == stop  # each reply, the inner one by the next turn's marker
    assert both.input_ids.count(stop) == last.input_ids.count(stop) + 1  # the inner `<|user|>` is not doubled


def test_lora_on_the_tied_head_is_refused(checkpoint):
    model = voxtune.load(str(checkpoint))  # GLM-ASR ties its output head to the input embeddings
    with pytest.raises(InputError, match="ties it to the input embeddings"):
        prepare_trainable(model, TrainSection(method="lora", lora={"targets": ["q_proj", "lm_head"]}))


@pytest.fixture(scope="module")
def trained(checkpoint, corpus, tmp_path_factory):
    """12 steps of LoRA on q, v and down_proj (the head is tied: see above): the run's folder."""
    return harness.train(
        checkpoint, corpus, tmp_path_factory.mktemp("train"), targets=["q_proj", "v_proj", "down_proj"]
    )


def test_training_lowers_the_loss_and_caches_the_frozen_tower(trained):
    harness.assert_trained_on_cached_features(trained)


def test_the_merged_export_and_the_adapters_load_in_transformers(checkpoint, trained):
    merged = voxtune.load(str(trained / "model"))
    audio = clip(2.5, seed=3)
    inputs = harness.templated_inputs(AutoProcessor.from_pretrained(trained / "model"), audio)
    batch = harness.prompt_batch(merged, messages(audio))
    harness.assert_exports_match(merged, batch, GlmAsrForConditionalGeneration, checkpoint, trained, inputs)


def test_the_openai_client_talks_to_it_through_the_server(model, checkpoint):
    harness.assert_served(model, checkpoint)
