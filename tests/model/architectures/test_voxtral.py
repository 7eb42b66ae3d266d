"""Voxtral read from its own checkpoint: the same prompt ids and numbers as its transformers class
and processor (mistral-common), clips of several chunks, LoRA on the LM alone, adapters and
merged exports that transformers + peft load, `voxtune train` and the OpenAI server on it. The
checkpoint is a tiny random one the tests build and save, with 2 s chunks (real: 30 s)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

pytest.importorskip("mistral_common", reason="Voxtral's tokenizer needs mistral-common (pip install 'voxtune[voxtral]')")

from openai import OpenAI  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoProcessor, MistralCommonBackend, VoxtralForConditionalGeneration  # noqa: E402

import voxtune  # noqa: E402
from voxtune.audio import Audio, encode, load  # noqa: E402
from voxtune.cli import main  # noqa: E402
from voxtune.model import ModelLoadError  # noqa: E402
from voxtune.model.architectures import voxtral  # noqa: E402
from voxtune.model.architectures.tiny import tiny_checkpoint  # noqa: E402
from voxtune.serve.config import ServeConfig  # noqa: E402
from voxtune.serve.server import build_runtime, running_server  # noqa: E402
from voxtune.train.model_setup import prepare_trainable  # noqa: E402
from voxtune.train.recipe import TrainSection  # noqa: E402

CHUNK_SECONDS = 2
TOKENS_PER_CHUNK = 25  # 12.5 per second
LM_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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


@pytest.fixture(scope="module")
def model(checkpoint):
    """The checkpoint as voxtune reads it (for the tests that leave it as it is)."""
    return voxtune.load(str(checkpoint))


def _wav(seconds: float, seed: int = 0) -> str:
    """A noise clip as base64 wav: both sides decode the same 16-bit samples."""
    rng = np.random.default_rng(seed)
    clip = Audio((0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    return base64.b64encode(encode(clip, "wav")).decode()


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
    example = model.processor.encode_messages(_ours(wav), add_generation_prompt=True)
    inputs = _reference_inputs(processor, _theirs(wav))
    assert example.input_ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ours = model(model.processor.collate([example])).logits
        theirs = hf(**inputs).logits
    assert (ours - theirs).abs().max() <= 1e-4
    new = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    expected = processor.tokenizer.decode(new, skip_special_tokens=True)
    assert model.generate(_ours(wav), max_new_tokens=8, ignore_eos=False) == expected
    # Batched (left-padded, clips of other lengths, one of two chunks) gives each conversation's own reply.
    other, longer = _ours(_wav(0.7, seed=1), "And this?"), _ours(_wav(3.1, seed=2), "Longer?")
    alone = [model.generate(c, max_new_tokens=8) for c in (other, longer)]
    assert model.generate([_ours(wav), other, longer], max_new_tokens=8) == [expected, *alone]
    # A clip encoded once stands in for its audio.
    embedded = model.encode_audio(load(base64.b64decode(wav), 16000))
    parts = [{"type": "audio", "audio": embedded}, {"type": "text", "text": "What is said?"}]
    assert model.generate([{"role": "user", "content": parts}], max_new_tokens=8) == expected


def test_a_batch_of_chats_has_the_processors_numbers(model, reference):
    hf, processor = reference
    waves = [_wav(4.6, seed=4), _wav(0.4, seed=5)]
    inputs = _reference_inputs(processor, _theirs(waves[0], "Two chunks"), _theirs(waves[1], "One"))
    examples = [model.processor.encode_messages(_ours(w, t)) for w, t in zip(waves, ("Two chunks", "One"))]
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
    clip = load(base64.b64decode(wav), 16000)
    features, frames = model.featurize([clip.samples])
    (embeddings,) = model.embed_audio(features, frames)
    assert model.audio_tokens(len(clip)) == expected == rows == embeddings.shape[0]


def test_chats_are_laid_out_as_mistral_common_does(model, checkpoint):
    serving = AutoProcessor.from_pretrained(checkpoint).tokenizer
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there "},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "Hello you  "}, {"role": "user", "content": "Again [AUDIO]"}]  # fmt: skip
    assert model.processor.encode_messages(chat).input_ids == serving.apply_chat_template(chat, return_dict=False)
    # Training ends on a reply: its text and </s> are the labels, nothing else.
    finetuning = MistralCommonBackend(tokenizer_path=checkpoint / "tekken.json", mode="finetuning")
    reply = {"role": "assistant", "content": [{"type": "text", "text": "B"}]}
    trained = chat[:-1] + [{"role": "user", "content": "Again"}, reply]
    example = model.processor.encode_messages(trained, with_labels=True)
    assert example.input_ids == finetuning.apply_chat_template(trained, return_dict=False)
    kept = [token for token, label in zip(example.input_ids, example.labels) if label != -100]
    assert model.tokenizer.decode(kept) == "Hello you</s>B</s>"


@pytest.mark.parametrize("language", ["en", None])
def test_transcription_is_voxtrals_own_request(model, reference, language):
    hf, processor = reference
    clip = load(base64.b64decode(_wav(3.4)), 16000)
    inputs = processor.apply_transcription_request(
        audio=[clip.samples], language=language, model_id="tiny", sampling_rate=16000, format=["wav"], **CHUNKS
    )
    asked = model.transcription_messages(clip, language)
    assert model.processor.encode_messages(asked).input_ids == inputs["input_ids"][0].tolist()
    new = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    expected = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert model.transcribe(clip, language, max_new_tokens=8) == expected
    # The transcribe task's training data: the bare transcript and </s> are the labels.
    example = model.processor.encode_messages(asked + [{"role": "assistant", "content": "<|lang:en|>Hello world."}],
                                              with_labels=True)  # fmt: skip
    kept = [token for token, label in zip(example.input_ids, example.labels) if label != -100]
    assert model.tokenizer.decode(kept) == "Hello world.</s>"


def test_lora_lands_on_the_lm_only_unless_the_encoder_is_asked(checkpoint):
    fresh = voxtune.load(str(checkpoint))
    params = prepare_trainable(fresh, TrainSection(method="lora"))
    targeted = set(fresh._peft.base_model.targeted_module_names)
    expected = {f"model.language_model.layers.{i}.{part}.{name}" for i in range(2)
                for part, names in (("self_attn", LM_LAYERS[:4]), ("mlp", LM_LAYERS[4:])) for name in names}  # fmt: skip
    assert targeted == expected
    assert all("lora_" in name for name, p in fresh.named_parameters() if p.requires_grad)
    assert len(params) == 2 * len(expected)  # A and B of each, the projector stays as it is
    batch = fresh.processor.collate([fresh.processor.encode_messages(
        _ours(_wav(2.5)) + [{"role": "assistant", "content": "hello"}], with_labels=True)])  # fmt: skip
    fresh(batch).loss.backward()
    grads = [p.grad for name, p in fresh.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    with_encoder = voxtune.load(str(checkpoint))
    prepare_trainable(with_encoder, TrainSection(method="lora", lora={"encoder": True}, train_projector=True))
    targeted = set(with_encoder._peft.base_model.targeted_module_names)
    assert {name for name in targeted if name.startswith("model.audio_tower.")} == {
        f"model.audio_tower.layers.{i}.{leaf}" for i in range(2) for leaf in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
    }  # fmt: skip
    assert targeted - {n for n in targeted if n.startswith("model.audio_tower.")} == expected
    assert all(p.requires_grad for p in with_encoder.projector.parameters())


def test_train_export_adapters_and_merged_load_in_transformers(checkpoint, reference, corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": {"load": str(checkpoint)},
        "data": {"train": [str(corpus / "train.jsonl")]},
        "train": {"max_steps": 16, "max_tokens": 2000, "log_every": 1,
                  "lora": {"r": 8, "targets": ["q_proj", "v_proj", "lm_head"]}},
        "optim": {"lr": 2e-2, "warmup_steps": 1},
        "eval": {"every": 100},
        "output": {"dir": str(tmp_path / "run"), "save_every": 100},
    }))  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4
    assert (run / "encoder_cache").is_dir()  # the frozen tower's outputs were cached

    merged = voxtune.load(str(run / "model"))
    wav = _wav(1.5, seed=3)
    batch = merged.processor.collate([merged.processor.encode_messages(_ours(wav), add_generation_prompt=True)])
    inputs = _reference_inputs(AutoProcessor.from_pretrained(run / "model"), _theirs(wav))
    base = VoxtralForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ours = merged(batch).logits
        before = reference[0](**inputs).logits
        exported = VoxtralForConditionalGeneration.from_pretrained(run / "model").eval()(**inputs).logits
        adapted = PeftModel.from_pretrained(base, run / "adapter").eval()(**inputs).logits
    assert (ours - before).abs().max() > 1e-3  # training changed the model
    assert (ours - exported).abs().max() <= 1e-4
    assert (ours - adapted).abs().max() <= 1e-4


def test_the_openai_client_talks_to_it_through_the_server(model, checkpoint):
    config = ServeConfig(model=str(checkpoint))
    runtime = build_runtime(config, model)
    wav = _wav(2.6, seed=6)
    part = {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    expected = model.generate(_ours(wav, "Hi"), max_new_tokens=6)
    try:
        with running_server(runtime, config) as url:
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            reply = client.chat.completions.create(
                model=checkpoint.name, max_tokens=6, temperature=0,
                messages=[{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}],
            )  # fmt: skip
            transcript = client.audio.transcriptions.create(model=checkpoint.name, file=("clip.wav", base64.b64decode(wav)))
    finally:
        runtime.close()
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens_details.audio_tokens == 2 * TOKENS_PER_CHUNK
    assert isinstance(transcript.text, str)


def test_without_mistral_common_loading_says_what_to_install(checkpoint, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(voxtral, "mistral_common_available", lambda: False)
    with pytest.raises(ModelLoadError, match=r"needs mistral-common: pip install 'voxtune\[voxtral\]'"):
        voxtune.load(str(checkpoint))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(base64.b64decode(_wav(1.0)))
    assert main(["transcribe", "--model", str(checkpoint), str(clip)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pip install 'voxtune[voxtral]'" in error
