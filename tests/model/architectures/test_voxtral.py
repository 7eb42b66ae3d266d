"""Voxtral read from its own checkpoint: the same prompt ids and numbers as its transformers class
and processor (mistral-common), clips of several chunks, LoRA on the LM alone, adapters and
merged exports that transformers + peft load, `voxtune train` and the OpenAI server on it. The
checkpoint is a tiny random one the tests build and save, with 2 s chunks (real: 30 s)."""

from __future__ import annotations

import base64

import pytest
import torch

pytest.importorskip(
    "mistral_common", reason="Voxtral's tokenizer needs mistral-common (pip install 'voxtune[voxtral]')"
)

import harness  # noqa: E402
from harness import clip  # noqa: E402
from transformers import AutoProcessor, MistralCommonBackend, VoxtralForConditionalGeneration  # noqa: E402

import voxtune  # noqa: E402
from voxtune.audio import encode, load  # noqa: E402
from voxtune.cli import main  # noqa: E402
from voxtune.model import ModelLoadError  # noqa: E402
from voxtune.model.architectures import voxtral  # noqa: E402
from voxtune.model.architectures.tiny import tiny_checkpoint  # noqa: E402

CHUNK_SECONDS = 2
TOKENS_PER_CHUNK = 25  # 12.5 per second
LM = harness.lm_layers("model.language_model.layers")  # its attention and MLP layers
# VoxtralProcessor pads to 30 s chunks unless told the checkpoint's own (its audio kwargs are class defaults).
CHUNKS = {"audio_kwargs": {"pad_to_multiple_of": 16000 * CHUNK_SECONDS, "max_source_positions": 100 * CHUNK_SECONDS}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Voxtral with 2 s chunks, saved in its own layout (tekken.json included)."""
    return tiny_checkpoint("voxtral", tmp_path_factory.mktemp("voxtral") / "model", chunk_seconds=CHUNK_SECONDS)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The architecture's own transformers model and processor."""
    return VoxtralForConditionalGeneration.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)


def _wav(seconds: float, seed: int = 0) -> str:
    """A noise clip as base64 wav: both sides decode the same 16-bit samples."""
    return base64.b64encode(encode(clip(seconds, seed), "wav")).decode()


def _ours(wav: str, text: str = "What is said?") -> list[dict]:
    audio = {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    return [{"role": "user", "content": [audio, {"type": "text", "text": text}]}]


def _theirs(wav: str, text: str = "What is said?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "base64": wav}, {"type": "text", "text": text}]}]


def _reference_inputs(processor, *conversations: list[dict]) -> dict:
    """What VoxtralProcessor makes of the conversations (left-padded when several)."""
    batch = list(conversations) if len(conversations) > 1 else conversations[0]
    return processor.apply_chat_template(batch, processor_kwargs=CHUNKS)


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(model, reference):
    hf, processor = reference
    assert isinstance(model, voxtral.VoxtralSpeechLM) and model.family.name == "mistral"
    wav = _wav(2.3)
    inputs = _reference_inputs(processor, _theirs(wav))
    expected = harness.assert_same_as_reference(model, hf, processor.tokenizer, _ours(wav), inputs)
    # Batched: with clips of other lengths, one of two chunks; and the clip encoded once.
    others = [_ours(_wav(0.7, seed=1), "And this?"), _ours(_wav(3.1, seed=2), "Longer?")]
    decoded = load(base64.b64decode(wav), 16000)
    harness.assert_batched_and_encoded_replies(model, _ours(wav), decoded, expected, others=others)


def test_a_batch_of_chats_has_the_processors_numbers(model, reference):
    hf, processor = reference
    waves = [_wav(4.6, seed=4), _wav(0.4, seed=5)]
    inputs = _reference_inputs(processor, _theirs(waves[0], "Two chunks"), _theirs(waves[1], "One"))
    examples = [model.processor.encode_messages(_ours(w, t)) for w, t in zip(waves, ("Two chunks", "One"), strict=True)]
    batch = model.processor.collate(examples, pad_left=True)
    mask = inputs["attention_mask"].bool()
    assert torch.equal(batch["input_ids"][mask], inputs["input_ids"][mask])
    assert batch["audio_features"].shape == (2, 128, 3 * 200)  # both clips padded to the longest's 3 chunks
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(**inputs).logits
    assert (ours - theirs)[mask].abs().max() <= 1e-4


@pytest.mark.parametrize("seconds", [0.2, 1.0, 2.0, 2.55, 7.3])
def test_placeholder_counts_match_the_processor_and_the_encoder(model, reference, seconds):
    hf, processor = reference
    wav = _wav(seconds)
    inputs = _reference_inputs(processor, _theirs(wav))
    expected = int((inputs["input_ids"] == hf.config.audio_token_id).sum())
    assert expected == -(-seconds // CHUNK_SECONDS) * TOKENS_PER_CHUNK
    with torch.no_grad():
        rows = hf.get_audio_features(inputs["input_features"]).pooler_output.shape[0]
    assert rows == expected
    harness.assert_audio_tokens(model, load(base64.b64decode(wav), 16000), expected)


def test_chats_are_laid_out_as_mistral_common_does(model, checkpoint):
    serving = AutoProcessor.from_pretrained(checkpoint).tokenizer
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi  there "},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "Hello you  "},
        {"role": "user", "content": "Again [AUDIO]"},
    ]
    assert model.processor.encode_messages(chat).input_ids == serving.apply_chat_template(chat, return_dict=False)
    # Training ends on a reply: its text and </s> are the labels, nothing else.
    finetuning = MistralCommonBackend(tokenizer_path=checkpoint / "tekken.json", mode="finetuning")
    reply = {"role": "assistant", "content": [{"type": "text", "text": "B"}]}
    trained = chat[:-1] + [{"role": "user", "content": "Again"}, reply]
    example = model.processor.encode_messages(trained, with_labels=True)
    assert example.input_ids == finetuning.apply_chat_template(trained, return_dict=False)
    kept = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert model.tokenizer.decode(kept) == "Hello you</s>B</s>"


@pytest.mark.parametrize("language", ["en", None])
def test_transcription_is_voxtrals_own_request(model, reference, language):
    hf, processor = reference
    audio = load(base64.b64decode(_wav(3.4)), 16000)
    inputs = processor.apply_transcription_request(
        audio=[audio.samples], language=language, model_id="tiny", sampling_rate=16000, format=["wav"], **CHUNKS
    )
    asked = model.transcription_messages(audio, language)
    assert model.processor.encode_messages(asked).input_ids == inputs["input_ids"][0].tolist()
    new = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    expected = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert model.transcribe(audio, language, max_new_tokens=8) == expected
    # The transcribe task's training data: the bare transcript and </s> are the labels.
    example = model.processor.encode_messages(
        asked + [{"role": "assistant", "content": "<|lang:en|>Hello world."}], with_labels=True
    )
    kept = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert model.tokenizer.decode(kept) == "Hello world.</s>"


def test_lora_lands_on_the_lm_only_unless_the_encoder_is_asked(checkpoint):
    model = harness.assert_lora_targets(checkpoint, LM)  # the projector stays as it is
    harness.assert_lora_b_gradients(model, harness.labelled_batch(model, _ours(_wav(2.5))))
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
    wav = _wav(1.5, seed=3)
    inputs = _reference_inputs(AutoProcessor.from_pretrained(trained / "model"), _theirs(wav))
    batch = harness.prompt_batch(merged, _ours(wav))
    harness.assert_exports_match(merged, batch, VoxtralForConditionalGeneration, checkpoint, trained, inputs)


def test_the_openai_client_talks_to_it_through_the_server(model, checkpoint):
    wav = _wav(2.6, seed=6)
    expected = model.generate(_ours(wav, "Hi"), max_new_tokens=6)
    served = harness.ask_server(model, checkpoint, base64.b64decode(wav), transcribe=True)
    assert served.reply == expected
    assert served.audio_tokens == 2 * TOKENS_PER_CHUNK
    assert served.transcript == served.expected_transcript


def test_without_mistral_common_loading_says_what_to_install(checkpoint, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(voxtral, "mistral_common_available", lambda: False)
    with pytest.raises(ModelLoadError, match=r"needs mistral-common: pip install 'voxtune\[voxtral\]'"):
        voxtune.load(str(checkpoint))
    wav = tmp_path / "clip.wav"
    wav.write_bytes(base64.b64decode(_wav(1.0)))
    assert main(["transcribe", "--model", str(checkpoint), str(wav)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pip install 'voxtune[voxtral]'" in error
