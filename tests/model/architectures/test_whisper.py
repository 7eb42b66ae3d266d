"""Whisper read from its own checkpoint as a speech recogniser: the same numbers and greedy
tokens as `WhisperForConditionalGeneration`, the engine's encoder-decoder cache, LoRA on the
decoder, `voxtune train` with exports that transformers + peft load, and the transcription
endpoint. The checkpoint is a tiny random multilingual one the tests build and save."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from openai import OpenAI
from peft import PeftModel
from transformers import AutoProcessor, WhisperForConditionalGeneration

import voxtune
from voxtune.audio import Audio, encode
from voxtune.cli import main
from voxtune.errors import InputError
from voxtune.infer import Runtime
from voxtune.model import MessageError
from voxtune.model.architectures.tiny import tiny_checkpoint
from voxtune.model.prompts import transcribe_messages
from voxtune.serve.config import ServeConfig
from voxtune.serve.server import build_runtime, running_server
from voxtune.train.model_setup import prepare_trainable
from voxtune.train.recipe import TrainSection


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random multilingual (en, de) Whisper with a 6 s window, saved in its own layout."""
    return tiny_checkpoint("whisper", tmp_path_factory.mktemp("whisper") / "model", seconds=6)


def _clip(seconds: float, seed: int = 0) -> Audio:
    rng = np.random.default_rng(seed)
    return Audio((0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)


def _greedy_sequence(hf, processor, clip: Audio, language: str, steps: int) -> list[int]:
    """The reference's whole greedy decoder sequence: its prompt, then `steps` tokens."""
    features = processor.feature_extractor(clip.samples, sampling_rate=16000, return_tensors="pt").input_features
    out = hf.generate(features, language=language, task="transcribe", max_new_tokens=steps, do_sample=False,
                      return_dict_in_generate=True)  # fmt: skip
    return out.sequences[0].tolist()


def test_same_logits_and_greedy_tokens_as_transformers(checkpoint):
    model = voxtune.load(str(checkpoint))
    hf = WhisperForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    clip = _clip(2.5)
    example = model.processor.encode_messages(transcribe_messages(clip, "de"), add_generation_prompt=True)
    ids = processor.tokenizer
    assert example.input_ids == ids.convert_tokens_to_ids(["<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>"])
    forced = _greedy_sequence(hf, processor, clip, "de", steps=8)
    assert forced[: len(example.input_ids)] == example.input_ids  # the same prompt as Whisper's own
    continuation = forced[len(example.input_ids) :]
    # Teacher-forced over the reference's greedy sequence: the same logits, and each position's
    # argmax is the token the reference chose next.
    features = processor.feature_extractor(clip.samples, sampling_rate=16000, return_tensors="pt").input_features
    batch = model.processor.collate([type(example)(forced, None, example.clips)])
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(input_features=features, decoder_input_ids=torch.tensor([forced])).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert ours[0, len(example.input_ids) - 1 : -1].argmax(-1).tolist() == continuation
    expected = processor.tokenizer.decode(continuation, skip_special_tokens=True).strip()
    assert model.generate(transcribe_messages(clip, "de"), max_new_tokens=len(continuation)) == expected
    # Rows of a batch keep their own clip and cross-attention cache (the engine adds and drops rows).
    other = transcribe_messages(_clip(1.0, seed=1), "en")
    alone = model.generate(other, max_new_tokens=len(continuation))
    assert model.generate([transcribe_messages(clip, "de"), other], max_new_tokens=len(continuation)) == [expected, alone]
    runtime = Runtime(model, max_batch=4)
    try:
        first = runtime.engine.generate(transcribe_messages(clip, "de"), max_new_tokens=len(continuation))
        second = runtime.engine.generate(other, max_new_tokens=len(continuation))
    finally:
        runtime.close()
    assert first.text.strip() == expected and second.text.strip() == alone


def test_one_clip_per_request_and_known_languages(checkpoint):
    model = voxtune.load(str(checkpoint))
    two = [{"role": "user", "content": [{"type": "audio", "audio": _clip(1.0)}, {"type": "audio", "audio": _clip(1.0, 1)}]}]
    with pytest.raises(MessageError, match="one clip per request, got 2"):
        model.generate(two)
    with pytest.raises(MessageError, match="does not know the language 'fr'"):
        model.generate(transcribe_messages(_clip(1.0), "fr"))
    with pytest.raises(MessageError, match="one clip per request, got 0"):
        model.generate([{"role": "user", "content": "hello"}])


def test_lora_lands_on_the_decoder_unless_the_encoder_is_asked(checkpoint):
    model = voxtune.load(str(checkpoint))
    prepare_trainable(model, TrainSection(method="lora"))
    targeted = set(model._peft.base_model.targeted_module_names)
    decoder = {f"model.decoder.layers.{i}.{attention}.{name}" for i in range(2) for attention in ("self_attn", "encoder_attn")
               for name in ("q_proj", "k_proj", "v_proj", "out_proj")} | {f"model.decoder.layers.{i}.{n}" for i in range(2) for n in ("fc1", "fc2")}  # fmt: skip
    assert targeted == decoder
    example = model.processor.encode_messages(transcribe_messages(_clip(1.0), "en") + [{"role": "assistant", "content": "hi"}], with_labels=True)
    model(model.processor.collate([example])).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(InputError, match="ties it to the input embeddings"):
        prepare_trainable(voxtune.load(str(checkpoint)), TrainSection(method="lora", lora={"targets": ["q_proj", "proj_out"]}))

    both = voxtune.load(str(checkpoint))
    prepare_trainable(both, TrainSection(method="lora", lora={"encoder": True}))
    encoder = {n for n in both._peft.base_model.targeted_module_names if n.startswith("model.encoder.")}
    assert encoder == {f"model.encoder.layers.{i}.{leaf}" for i in range(2) for leaf in
                       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")}  # fmt: skip


def test_train_lowers_the_loss_and_exports_what_transformers_loads(checkpoint, corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": {"load": str(checkpoint)},
        "data": {"train": [str(corpus / "train.jsonl")]},
        "train": {"max_steps": 16, "max_tokens": 2000, "log_every": 1,
                  "lora": {"r": 8, "targets": ["q_proj", "v_proj", "fc1", "fc2"]}},
        "optim": {"lr": 2e-2, "warmup_steps": 1},
        "eval": {"every": 100},
        "output": {"dir": str(tmp_path / "run"), "save_every": 100},
    }))  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4
    assert (run / "encoder_cache").is_dir()  # the frozen encoder's outputs were cached

    merged = voxtune.load(str(run / "model"))
    clip = _clip(1.5, seed=3)
    example = merged.processor.encode_messages(transcribe_messages(clip, "en"), add_generation_prompt=True)
    processor = AutoProcessor.from_pretrained(run / "model")
    features = processor.feature_extractor(clip.samples, sampling_rate=16000, return_tensors="pt").input_features
    decoder_ids = torch.tensor([example.input_ids])
    base = WhisperForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ours = merged(merged.processor.collate([example])).logits
        before = base(input_features=features, decoder_input_ids=decoder_ids).logits
        exported = WhisperForConditionalGeneration.from_pretrained(run / "model").eval()(input_features=features, decoder_input_ids=decoder_ids).logits
        adapted = PeftModel.from_pretrained(base, run / "adapter").eval()(input_features=features, decoder_input_ids=decoder_ids).logits
    assert (ours - before).abs().max() > 1e-3
    assert (ours - exported).abs().max() <= 1e-4
    assert (ours - adapted).abs().max() <= 1e-4


def test_the_transcription_endpoint_serves_it(checkpoint):
    model = voxtune.load(str(checkpoint))
    config = ServeConfig(model=str(checkpoint))
    runtime = build_runtime(config, model)
    clip = _clip(1.2, seed=4)
    try:
        expected = runtime.transcribe(clip, "en").text
        with running_server(runtime, config) as url:
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            text = client.audio.transcriptions.create(model=checkpoint.name, file=("clip.wav", encode(clip, "wav")), language="en").text
    finally:
        runtime.close()
    assert text == expected


def test_the_real_whisper_tiny_en_transcribes_through_voxtune(whisper_tiny_en):
    """The converted Whisper tiny.en, served: the same transcript as transformers' own
    `generate`, and the words that were spoken."""
    from voxtune.audio import voices

    model = voxtune.load(str(whisper_tiny_en))
    speech = voices.synthesize("Hello world.", "en", "onyx").resample(16000)
    hf = WhisperForConditionalGeneration.from_pretrained(whisper_tiny_en).eval()
    processor = AutoProcessor.from_pretrained(whisper_tiny_en)
    features = processor.feature_extractor(speech.samples, sampling_rate=16000, return_tensors="pt").input_features
    expected = processor.tokenizer.decode(hf.generate(features, max_new_tokens=40)[0], skip_special_tokens=True).strip()
    assert model.transcribe(speech) == expected
    assert "hello world" in expected.lower()
    config = ServeConfig(model=str(whisper_tiny_en))
    runtime = build_runtime(config, model)
    try:
        with running_server(runtime, config) as url:
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            text = client.audio.transcriptions.create(model=whisper_tiny_en.name, file=("hello.wav", encode(speech, "wav"))).text
    finally:
        runtime.close()
    assert "hello world" in text.lower()
