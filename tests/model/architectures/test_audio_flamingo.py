"""Audio Flamingo 3 and Music Flamingo read from their own checkpoints: the same numbers as
their transformers classes and processors (clips longer than a window included), LoRA on the LM
alone, adapters and merged exports that transformers + peft load, `voxtune train` and the
OpenAI server on it. The checkpoints are tiny random ones with a 1 s window, built here."""

from __future__ import annotations

import harness
import numpy as np
import pytest
import torch
import transformers
from harness import clip, messages
from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

import voxtune
from voxtune.audio import Audio, AudioTooLongError
from voxtune.model.architectures.pretrained import PretrainedSpeechLM
from voxtune.model.architectures.tiny import tiny_checkpoint

LM = harness.lm_layers("model.language_model.layers")  # its attention and MLP layers
CLASSES = {
    "audioflamingo3": "AudioFlamingo3ForConditionalGeneration",
    "musicflamingo": "MusicFlamingoForConditionalGeneration",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random checkpoints of both, with a 1 s window, saved in their own layout."""
    root = tmp_path_factory.mktemp("flamingo")
    return {name: tiny_checkpoint(name, root / name, seconds=1) for name in CLASSES}


@pytest.fixture(scope="module", params=list(CLASSES))
def loaded(request, checkpoints):
    """(model type, voxtune's model, the transformers model, the transformers processor)."""
    path = checkpoints[request.param]
    hf = getattr(transformers, CLASSES[request.param]).from_pretrained(path).eval()
    return request.param, voxtune.load(str(path)), hf, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints["audioflamingo3"]


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(loaded):
    name, model, hf, processor = loaded
    assert isinstance(model, PretrainedSpeechLM) and model.family.name == "qwen2" and model.architecture == name
    marked = "<|sound_bos|><sound><|sound_eos|>" if name == "musicflamingo" else "<sound>"
    assert model.processor.audio_text == marked
    audio = clip(2.3)  # three 1 s windows
    chat = messages(audio)
    inputs = harness.templated_inputs(processor, audio)
    assert inputs["input_features"].shape == (3, 128, 100)
    expected = harness.assert_same_as_reference(model, hf, processor.tokenizer, chat, inputs)
    # Batched: with a clip of other window counts.
    harness.assert_batched_and_encoded_replies(model, chat, audio, expected)


# 1.23457 s: not whole hops, two windows; 2.3 s: three windows; 3.0001 s: a last window of one
# frame, which gives no token.
@pytest.mark.parametrize("seconds", [0.2, 1.0, 1.23457, 2.3, 3.0001])
def test_placeholder_counts_match_the_processor_and_the_encoder(loaded, seconds):
    name, model, hf, processor = loaded
    audio = clip(seconds)
    inputs = harness.templated_inputs(processor, audio)
    expected = int((inputs["input_ids"] == hf.config.audio_token_id).sum())
    embeddings, frames = harness.assert_audio_tokens(model, audio, expected)
    assert int(frames[0]) == int(inputs["input_features_mask"].sum())
    if name == "musicflamingo" and seconds == 3.0001:
        # MusicFlamingoModel._build_audio_timestamps maps a window with no token to the next
        # clip and fails (IndexError); the processor's count above is what matters here.
        return
    extra = {"input_ids": inputs["input_ids"]} if name == "musicflamingo" else {}
    with torch.no_grad():
        rows = hf.get_audio_features(inputs["input_features"], inputs["input_features_mask"], **extra).pooler_output
    assert (embeddings - rows).abs().max() <= 1e-5


def test_batched_clips_are_featurised_as_each_alone(loaded):
    model = loaded[1]
    clips = [clip(1.23457).samples, clip(0.3, seed=1).samples, clip(2.5, seed=2).samples]
    features, frames = model.featurize(clips)
    assert features.shape == (3, 128, 300)  # the most windows (3) side by side
    for i, samples in enumerate(clips):
        alone, count = model.featurize([samples])
        assert frames[i] == count[0] and torch.equal(features[i, :, : alone.shape[-1]], alone[0])


def test_clips_longer_than_the_processor_reads_are_refused(loaded):
    name, model, _, processor = loaded
    assert model.processor.max_seconds == processor.max_audio_len == (1200 if name == "musicflamingo" else 600)
    # The processor would keep the clip's first max_audio_len seconds (and log a warning).
    silence = Audio(np.zeros(16000 * processor.max_audio_len + 1600, np.float32), 16000)
    with pytest.raises(AudioTooLongError, match=f"takes at most {processor.max_audio_len} s per clip"):
        model.processor.encode_messages(messages(silence))


def test_transcripts_are_asked_and_read_as_the_processor_does(loaded):
    name, model, _, processor = loaded
    audio = clip(1.0)
    (turn,) = model.transcription_messages(audio)
    if name == "musicflamingo":  # its processor has no transcription prompt: voxtune's plain request
        assert turn["content"][1] == PretrainedSpeechLM.transcription_messages(model, audio)[0]["content"][1]
        return
    assert turn["content"][1] == {"type": "text", "text": processor.default_transcription_prompt}
    replies = [
        'The spoken content of the audio is "hello there".',
        "The transcription of the audio is 'a b'.",
        "Plain words.",
        '"quoted"',
    ]
    for reply in replies:
        assert model.read_transcript(reply) == (processor._strip_assistant_prefix_and_quotes(reply), None)
    # Partial replies (streamed): nothing while the framing is written, then the words so far.
    partial = [model.read_transcript(r)[0] for r in ("The spoken con", 'The spoken content of the audio is "hel')]
    assert partial == ["", "hel"]


def test_lora_lands_on_the_lm_only_unless_the_encoder_is_asked(loaded, checkpoints):
    path = checkpoints[loaded[0]]
    model = harness.assert_lora_targets(path, LM)  # the projector stays as it is
    harness.assert_lora_b_gradients(model, harness.labelled_batch(model, messages(clip(1.5))))
    tower = {f"model.audio_tower.layers.{i}.{leaf}" for i in range(2) for leaf in harness.WHISPER_ENCODER}
    harness.assert_encoder_lora(path, tower, LM)


@pytest.fixture(scope="module")
def trained(checkpoint, corpus, tmp_path_factory):
    """Audio Flamingo 3: 12 steps of LoRA on q, v and the head; the run's folder."""
    return harness.train(checkpoint, corpus, tmp_path_factory.mktemp("train"), targets=["q_proj", "v_proj", "lm_head"])


def test_training_lowers_the_loss_and_caches_the_frozen_tower(trained):
    harness.assert_trained_on_cached_features(trained)


def test_the_merged_export_and_the_adapters_load_in_transformers(checkpoint, trained):
    merged = voxtune.load(str(trained / "model"))
    audio = clip(1.5, seed=3)
    inputs = harness.templated_inputs(AutoProcessor.from_pretrained(trained / "model"), audio)
    batch = harness.prompt_batch(merged, messages(audio))
    harness.assert_exports_match(merged, batch, AudioFlamingo3ForConditionalGeneration, checkpoint, trained, inputs)


def test_the_openai_client_talks_to_it_through_the_server(model, checkpoint):
    harness.assert_served(model, checkpoint)
