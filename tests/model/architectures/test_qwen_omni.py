"""Qwen2.5-Omni and Qwen3-Omni-MoE thinkers read from their own checkpoints: the same numbers
as the thinker's transformers class, LoRA on the LM alone (attention only for the MoE), adapters
and merged exports that transformers + peft load, `voxtune train` and the OpenAI server on them.
The checkpoints are tiny random ones the tests build, in the full Omni model's layout.

The Omni processors cannot load here (their video processor needs torchvision), so the
reference inputs are built the way they would build them: the checkpoint's
WhisperFeatureExtractor with the processor class's own audio settings, the audio placeholder
repeated by the processor module's own token formula, and the tokenizer."""

from __future__ import annotations

import importlib.util
import json

import harness
import pytest
import torch
from harness import clip, messages
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen3OmniMoeProcessor,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths as qwen25_tokens
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import (
    _get_feat_extract_output_lengths as qwen3_tokens,
)

import voxtune
from voxtune.audio import Audio, AudioTooLongError
from voxtune.model import ModelLoadError
from voxtune.model.architectures.qwen_omni import OmniAudioProcessor, OmniSpeechLM, load_omni_processor
from voxtune.model.architectures.tiny import tiny_checkpoint

# Per generation: the thinker's class, its processor class (for its audio settings), the
# processor's token formula, its LM family and default LM LoRA targets, and the speech-out
# parts of the full model (left unread).
GENERATIONS = {
    "qwen2_5_omni": (
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2_5OmniProcessor,
        qwen25_tokens,
        "qwen2",
        harness.ATTENTION + harness.MLP,
        ("talker", "token2wav"),
    ),
    "qwen3_omni_moe": (
        Qwen3OmniMoeThinkerForConditionalGeneration,
        Qwen3OmniMoeProcessor,
        lambda n: qwen3_tokens(n, 50),
        "qwen3_moe",
        harness.ATTENTION,
        ("talker", "code2wav"),
    ),
}


@pytest.fixture(scope="module", params=list(GENERATIONS))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(kind, tmp_path_factory):
    """A tiny random Omni model with a 6 s feature-extractor window, saved in its own layout."""
    return tiny_checkpoint(kind, tmp_path_factory.mktemp(kind) / "model", model_type=kind, seconds=6)


@pytest.fixture(scope="module")
def reference(kind, checkpoint):
    """The thinker as its own transformers class loads it."""
    return GENERATIONS[kind][0].from_pretrained(checkpoint).eval()


def _reference_inputs(kind: str, model, audio: Audio, text: str = "What is said?") -> dict:
    """What the generation's processor makes of a one-clip prompt (see the module doc)."""
    _, processor_class, tokens, *_ = GENERATIONS[kind]
    features = model.hf_processor.feature_extractor(
        [audio.samples], **processor_class.audio_kwargs, return_tensors="pt"
    )
    mask = features["attention_mask"]
    chat = model.processor._render([{"role": "user", "content": model.processor.audio_text + text}], True)
    placeholder = model.processor.audio_token
    ids = model.tokenizer(chat.replace(placeholder, placeholder * int(tokens(mask.sum(-1))[0])), return_tensors="pt")
    return {**ids, "input_features": features["input_features"], "feature_attention_mask": mask}


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(kind, model, reference):
    assert isinstance(model, OmniSpeechLM) and model.family.name == GENERATIONS[kind][3]
    audio = clip(2.3)
    chat = messages(audio)
    # The thinker's generate computes its 3-D TMRoPE positions; voxtune's plain ones match them.
    inputs = _reference_inputs(kind, model, audio)
    expected = harness.assert_same_as_reference(model, reference, model.tokenizer, chat, inputs)
    harness.assert_batched_and_encoded_replies(model, chat, audio, expected)


# 1.2345 s: not whole hops; 7.5 s: longer than the feature extractor's 6 s window, which
# Qwen3-Omni's processor does not pad or cut to (Qwen2.5-Omni's cuts, and voxtune refuses).
@pytest.mark.parametrize("seconds", [0.2, 1.0, 1.2345, 2.55, 6.0, 7.5])
def test_placeholder_counts_match_the_processor_and_the_encoder(kind, model, reference, seconds):
    audio = clip(seconds)
    if kind == "qwen2_5_omni" and seconds > 6:
        with pytest.raises(AudioTooLongError, match=r"takes at most 6 s per clip"):
            model.processor.encode_messages(messages(audio))
        return
    inputs = _reference_inputs(kind, model, audio)
    expected = int((inputs["input_ids"] == reference.config.audio_token_id).sum())
    embeddings, _ = harness.assert_audio_tokens(model, audio, expected)
    with torch.no_grad():
        rows = reference.get_audio_features(
            inputs["input_features"], inputs["feature_attention_mask"]
        ).last_hidden_state
    assert (embeddings - rows).abs().max() <= 1e-5


def test_the_thinker_alone_and_a_full_model_with_speech_out_load_alike(kind, model, checkpoint, reference, tmp_path):
    """A thinker saved alone has its own model_type; a released full model also holds the
    talker's and the codec's weights, which the thinker's class leaves unread."""
    alone = tmp_path / "thinker"
    reference.save_pretrained(alone)
    model.hf_processor.save_pretrained(alone)
    assert json.loads((alone / "config.json").read_text())["model_type"] == f"{kind}_thinker"

    full = harness.copy_files(checkpoint, tmp_path / "full")
    weights = load_file(full / "model.safetensors")
    for part in GENERATIONS[kind][5]:
        weights[f"{part}.some_layer.weight"] = torch.ones(2, 2)
    save_file(weights, full / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**config, "enable_audio_output": True}))

    batch = harness.prompt_batch(model, messages(clip(1.1)))
    with torch.no_grad():
        expected = model(batch).logits
        for path in (alone, full):
            assert (voxtune.load(str(path))(batch).logits - expected).abs().max() <= 1e-6


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="the Omni processor loads with torchvision"
)
def test_without_torchvision_the_processor_is_read_as_its_audio_half(model, checkpoint, tmp_path):
    with pytest.raises((ValueError, ImportError, AttributeError)):
        AutoProcessor.from_pretrained(checkpoint)  # its image and video halves cannot load
    # A released checkpoint's preprocessor_config.json holds the image processor's settings too.
    source = harness.copy_files(checkpoint, tmp_path / "source")
    settings = json.loads((source / "preprocessor_config.json").read_text())
    settings |= {"image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2, "patch_size": 14}
    (source / "preprocessor_config.json").write_text(json.dumps(settings))
    processor = load_omni_processor(source)
    assert isinstance(processor, OmniAudioProcessor) and isinstance(model.hf_processor, OmniAudioProcessor)
    assert processor.feature_extractor.feature_size == 128 and processor.feature_extractor.chunk_length == 6
    assert processor.chat_template == model.tokenizer.chat_template
    processor.save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "preprocessor_config.json").read_text()) == settings
    again = OmniAudioProcessor.from_pretrained(tmp_path / "copy")
    text = model.processor.audio_text + "hello<|im_end|>"
    assert again.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    assert (
        again.tokenizer.audio_token == processor.tokenizer.audio_token
        and again.chat_template == processor.chat_template
    )


def test_lora_lands_on_the_lm_attention_and_mlp_it_targets_unless_the_encoder_is_asked(kind, checkpoint):
    lm_targets = GENERATIONS[kind][4]
    expected = harness.lm_layers("model.language_model.layers", lm_targets)
    model = harness.assert_lora_targets(checkpoint, expected)
    assert model.family.lora_targets == lm_targets  # Qwen3-Omni: its experts are fused, not linear layers
    harness.assert_lora_b_gradients(model, harness.labelled_batch(model, messages(clip(1.0))))
    tower = {f"model.audio_tower.layers.{i}.{leaf}" for i in range(2) for leaf in harness.WHISPER_ENCODER}
    # Nothing of the vision tower, the experts or the routers; the projector as the default has it.
    harness.assert_encoder_lora(checkpoint, tower, expected, train_projector=None)


@pytest.fixture(scope="module")
def trained(checkpoint, corpus, tmp_path_factory):
    """12 steps of LoRA on q, v and the head: the run's folder."""
    return harness.train(checkpoint, corpus, tmp_path_factory.mktemp("train"), targets=["q_proj", "v_proj", "lm_head"])


def test_training_lowers_the_loss_and_caches_the_frozen_tower(trained):
    harness.assert_trained_on_cached_features(trained)


def test_the_merged_thinker_and_the_adapters_load_in_transformers(kind, checkpoint, trained):
    merged = voxtune.load(str(trained / "model"))  # the thinker alone: the talker is not voxtune's to export
    audio = clip(1.5, seed=3)
    inputs = _reference_inputs(kind, merged, audio)
    batch = harness.prompt_batch(merged, messages(audio))
    harness.assert_exports_match(merged, batch, GENERATIONS[kind][0], checkpoint, trained, inputs)


def test_the_openai_client_talks_to_it_through_the_server(model, checkpoint):
    harness.assert_served(model, checkpoint, transcribe=False)


def test_missing_processor_files_are_named(checkpoint, tmp_path):
    bare = harness.copy_files(checkpoint, tmp_path / "bare", harness.WEIGHTS_ONLY)
    with pytest.raises(
        ModelLoadError, match=r"has no preprocessor_config.json: the checkpoint is missing its processor files"
    ):
        voxtune.load(str(bare))


def test_tiny_builds_the_generation_it_is_named_by(tmp_path):
    for model_type in ("qwen2_5_omni", "qwen3_omni_moe"):
        path = tiny_checkpoint(model_type, tmp_path / model_type)
        assert json.loads((path / "config.json").read_text())["model_type"] == model_type
