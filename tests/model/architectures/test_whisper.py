"""Whisper read from its own checkpoint as a speech recogniser: the same numbers and greedy
tokens as `WhisperForConditionalGeneration`, the engine's encoder-decoder cache, LoRA on the
decoder, `voxtune train` with exports that transformers + peft load, and the transcription
endpoint. The checkpoint is a tiny random multilingual one the tests build and save."""

from __future__ import annotations

import harness
import pytest
import torch
from harness import clip
from transformers import AutoProcessor, WhisperForConditionalGeneration

import voxtune
from voxtune.audio import Audio, encode
from voxtune.errors import InputError
from voxtune.infer import Runtime
from voxtune.model import MessageError
from voxtune.model.architectures.tiny import tiny_checkpoint
from voxtune.model.prompts import transcribe_messages
from voxtune.train.model_setup import prepare_trainable
from voxtune.train.recipe import TrainSection

# The decoder's linear layers: self-attention, cross-attention (to the encoder) and the MLP.
DECODER = {
    f"model.decoder.layers.{i}.{attention}.{name}"
    for i in range(2)
    for attention in ("self_attn", "encoder_attn")
    for name in ("q_proj", "k_proj", "v_proj", "out_proj")
} | {f"model.decoder.layers.{i}.{n}" for i in range(2) for n in ("fc1", "fc2")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random multilingual (en, de) Whisper with a 6 s window, saved in its own layout."""
    return tiny_checkpoint("whisper", tmp_path_factory.mktemp("whisper") / "model", seconds=6)


def _features(processor, audio: Audio) -> torch.Tensor:
    """The reference's log-mel features of `audio`."""
    return processor.feature_extractor(audio.samples, sampling_rate=16000, return_tensors="pt").input_features


def _greedy_sequence(hf, processor, audio: Audio, language: str, steps: int) -> list[int]:
    """The reference's whole greedy decoder sequence: its prompt, then `steps` tokens."""
    out = hf.generate(
        _features(processor, audio),
        language=language,
        task="transcribe",
        max_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
    )
    return out.sequences[0].tolist()


def test_same_logits_and_greedy_tokens_as_transformers(model, checkpoint):
    hf = WhisperForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    audio = clip(2.5)
    example = model.processor.encode_messages(transcribe_messages(audio, "de"), add_generation_prompt=True)
    ids = processor.tokenizer
    assert example.input_ids == ids.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>"]
    )
    forced = _greedy_sequence(hf, processor, audio, "de", steps=8)
    assert forced[: len(example.input_ids)] == example.input_ids  # the same prompt as Whisper's own
    continuation = forced[len(example.input_ids) :]
    # Teacher-forced over the reference's greedy sequence: the same logits, and each position's
    # argmax is the token the reference chose next.
    batch = model.processor.collate([type(example)(forced, None, example.clips)])
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(input_features=_features(processor, audio), decoder_input_ids=torch.tensor([forced])).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert ours[0, len(example.input_ids) - 1 : -1].argmax(-1).tolist() == continuation
    expected = processor.tokenizer.decode(continuation, skip_special_tokens=True).strip()
    assert model.generate(transcribe_messages(audio, "de"), max_new_tokens=len(continuation)) == expected
    # Rows of a batch keep their own clip and cross-attention cache (the engine adds and drops rows).
    other = transcribe_messages(clip(1.0, seed=1), "en")
    alone = model.generate(other, max_new_tokens=len(continuation))
    assert model.generate([transcribe_messages(audio, "de"), other], max_new_tokens=len(continuation)) == [
        expected,
        alone,
    ]
    runtime = Runtime(model, max_batch=4)
    try:
        first = runtime.engine.generate(transcribe_messages(audio, "de"), max_new_tokens=len(continuation))
        second = runtime.engine.generate(other, max_new_tokens=len(continuation))
    finally:
        runtime.close()
    assert first.text.strip() == expected and second.text.strip() == alone


def test_one_clip_per_request_and_known_languages(model):
    two = [
        {"role": "user", "content": [{"type": "audio", "audio": clip(1.0)}, {"type": "audio", "audio": clip(1.0, 1)}]}
    ]
    with pytest.raises(MessageError, match="one clip per request, got 2"):
        model.generate(two)
    with pytest.raises(MessageError, match="does not know the language 'fr'"):
        model.generate(transcribe_messages(clip(1.0), "fr"))
    with pytest.raises(MessageError, match="one clip per request, got 0"):
        model.generate([{"role": "user", "content": "hello"}])


def test_lora_lands_on_the_decoder_unless_the_encoder_is_asked(checkpoint):
    model = harness.assert_lora_targets(checkpoint, DECODER)
    harness.assert_lora_b_gradients(
        model, harness.labelled_batch(model, transcribe_messages(clip(1.0), "en"), reply="hi")
    )
    with pytest.raises(InputError, match="ties it to the input embeddings"):
        prepare_trainable(
            voxtune.load(str(checkpoint)), TrainSection(method="lora", lora={"targets": ["q_proj", "proj_out"]})
        )
    tower = {f"model.encoder.layers.{i}.{leaf}" for i in range(2) for leaf in harness.WHISPER_ENCODER}
    harness.assert_encoder_lora(checkpoint, tower, DECODER, prefix="model.encoder.", train_projector=None)


@pytest.fixture(scope="module")
def trained(checkpoint, corpus, tmp_path_factory):
    """16 steps of LoRA on the decoder's q, v and MLP: the run's folder."""
    targets = ["q_proj", "v_proj", "fc1", "fc2"]
    return harness.train(checkpoint, corpus, tmp_path_factory.mktemp("train"), max_steps=16, targets=targets)


def test_training_lowers_the_loss_and_caches_the_frozen_encoder(trained):
    harness.assert_trained_on_cached_features(trained)


def test_the_merged_export_and_the_adapters_load_in_transformers(checkpoint, trained):
    merged = voxtune.load(str(trained / "model"))
    audio = clip(1.5, seed=3)
    example = merged.processor.encode_messages(transcribe_messages(audio, "en"), add_generation_prompt=True)
    features = _features(AutoProcessor.from_pretrained(trained / "model"), audio)
    inputs = {"input_features": features, "decoder_input_ids": torch.tensor([example.input_ids])}
    batch = merged.processor.collate([example])
    harness.assert_exports_match(merged, batch, WhisperForConditionalGeneration, checkpoint, trained, inputs)


def test_the_transcription_endpoint_serves_it(model, checkpoint):
    audio = clip(1.2, seed=4)
    with harness.serving(model, checkpoint) as (client, runtime):
        expected = runtime.transcribe(audio, "en").text
        file = ("clip.wav", encode(audio, "wav"))
        text = client.audio.transcriptions.create(model=checkpoint.name, file=file, language="en").text
    assert text == expected


def test_the_real_whisper_tiny_en_transcribes_through_voxtune(whisper_tiny_en):
    """The converted Whisper tiny.en, served: the same transcript as transformers' own
    `generate`, and the words that were spoken."""
    from voxtune.audio import voices

    model = voxtune.load(str(whisper_tiny_en))
    speech = voices.synthesize("Hello world.", "en", "onyx", backend=voices.PiperBackend(seed=0)).resample(16000)
    hf = WhisperForConditionalGeneration.from_pretrained(whisper_tiny_en).eval()
    processor = AutoProcessor.from_pretrained(whisper_tiny_en)
    new = hf.generate(_features(processor, speech), max_new_tokens=40)[0]
    expected = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert model.transcribe(speech) == expected
    assert "hello world" in expected.lower()
    with harness.serving(model, whisper_tiny_en) as (client, _):
        text = client.audio.transcriptions.create(
            model=whisper_tiny_en.name, file=("hello.wav", encode(speech, "wav"))
        ).text
    assert "hello world" in text.lower()
