"""GLM-ASR read from its own checkpoint: the same numbers as its transformers class and
processor (clips longer than a window included), LoRA on the LM alone, adapters and merged
exports that transformers + peft load, `voxtune train` and the OpenAI server on it. The
checkpoint is a tiny random one with a 2 s window (200 frames: 25 tokens), built here."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from openai import OpenAI
from peft import PeftModel
from transformers import AutoProcessor, GlmAsrForConditionalGeneration

import voxtune
from voxtune.audio import Audio, encode
from voxtune.cli import main
from voxtune.errors import InputError
from voxtune.model.architectures.pretrained import PretrainedSpeechLM
from voxtune.model.architectures.tiny import tiny_checkpoint
from voxtune.serve.config import ServeConfig
from voxtune.serve.server import build_runtime, running_server
from voxtune.train.model_setup import prepare_trainable
from voxtune.train.recipe import TrainSection

LM_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENCODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random GLM-ASR with a 2 s window, saved in its own layout."""
    return tiny_checkpoint("glmasr", tmp_path_factory.mktemp("glm-asr") / "model", seconds=2, init_std=0.1)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The architecture's own transformers model and processor."""
    return GlmAsrForConditionalGeneration.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint):
    return voxtune.load(str(checkpoint))


def _clip(seconds: float, seed: int = 0) -> Audio:
    rng = np.random.default_rng(seed)
    return Audio((0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)


def _messages(clip, text: str = "What is said?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": text}]}]


def _reference_inputs(processor, clip: Audio, text: str = "What is said?") -> dict:
    """What the architecture's own processor makes of the same chat (rendered by its own template)."""
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]}]
    rendered = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return processor(text=rendered, audio=[clip.samples], return_tensors="pt")


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(model, reference):
    hf, processor = reference
    assert isinstance(model, PretrainedSpeechLM) and model.family.name == "glm4"
    assert model.processor.audio_text == "<|begin_of_audio|><|pad|><|end_of_audio|><|user|>\n"
    clip = _clip(4.5)  # three 2 s windows
    messages = _messages(clip)
    example = model.processor.encode_messages(messages, add_generation_prompt=True)
    inputs = _reference_inputs(processor, clip)
    assert inputs["input_features"].shape == (3, 128, 200)
    assert example.input_ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ours = model(model.processor.collate([example])).logits
        theirs = hf(**inputs).logits
    assert (ours - theirs).abs().max() <= 1e-4
    new = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    expected = processor.tokenizer.decode(new, skip_special_tokens=True)
    assert model.generate(messages, max_new_tokens=8, ignore_eos=False) == expected
    # Batched (left-padded, clips of other window counts) gives each conversation's own reply.
    other = _messages(_clip(0.7, seed=1), "And this?")
    alone = model.generate(other, max_new_tokens=8)
    assert model.generate([messages, other], max_new_tokens=8) == [expected, alone]
    # A clip encoded once stands in for its audio.
    assert model.generate(_messages(model.encode_audio(clip)), max_new_tokens=8) == expected


# 1.23457 s: not whole hops; 2.0001 s: a second window of one frame (no token); 3.1 s and
# 4.5 s: two and three windows, the last ones partial.
@pytest.mark.parametrize("seconds", [0.2, 1.0, 1.23457, 2.0001, 3.1, 4.5])
def test_placeholder_counts_match_the_processor_and_the_encoder(model, reference, seconds):
    hf, processor = reference
    clip = _clip(seconds)
    inputs = _reference_inputs(processor, clip)
    expected = int((inputs["input_ids"] == hf.config.audio_token_id).sum())
    features, frames = model.featurize([clip.samples])
    assert int(frames[0]) == int(inputs["input_features_mask"].sum())
    (embeddings,) = model.embed_audio(features, frames)
    assert model.audio_tokens(len(clip)) == expected == embeddings.shape[0]
    with torch.no_grad():
        rows = hf.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    assert (embeddings - rows).abs().max() <= 1e-5


def test_transcripts_are_asked_with_the_processors_prompt(model, reference):
    processor = reference[1]
    (turn,) = model.transcription_messages(_clip(1.0))
    assert turn["content"][0]["type"] == "audio"  # as apply_transcription_request lays it out
    assert turn["content"][1] == {"type": "text", "text": processor.default_transcription_prompt}
    assert model.read_transcript(" the words \n") == ("the words", None)


def test_lora_lands_on_the_lm_only_unless_the_encoder_is_asked(checkpoint):
    model = voxtune.load(str(checkpoint))
    params = prepare_trainable(model, TrainSection(method="lora"))
    targeted = set(model._peft.base_model.targeted_module_names)
    leaves = [f"self_attn.{name}" for name in LM_LAYERS[:4]] + [f"mlp.{name}" for name in LM_LAYERS[4:]]
    expected = {f"model.language_model.layers.{i}.{leaf}" for i in range(2) for leaf in leaves}
    assert targeted == expected
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert len(params) == 2 * len(expected)  # A and B of each, the projector stays as it is
    batch = model.processor.collate([model.processor.encode_messages(
        _messages(_clip(1.0)) + [{"role": "assistant", "content": "hello"}], with_labels=True)])  # fmt: skip
    model(batch).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    with_encoder = voxtune.load(str(checkpoint))
    prepare_trainable(with_encoder, TrainSection(method="lora", lora={"encoder": True}, train_projector=True))
    targeted = set(with_encoder._peft.base_model.targeted_module_names)
    tower = {name for name in targeted if name.startswith("model.audio_tower.")}
    assert tower == {f"model.audio_tower.layers.{i}.{leaf}" for i in range(2) for leaf in ENCODER}
    assert targeted - tower == expected
    assert all(p.requires_grad for p in with_encoder.projector.parameters())


def test_lora_on_the_tied_head_is_refused(checkpoint):
    model = voxtune.load(str(checkpoint))  # GLM-ASR ties its output head to the input embeddings
    with pytest.raises(InputError, match="ties it to the input embeddings"):
        prepare_trainable(model, TrainSection(method="lora", lora={"targets": ["q_proj", "lm_head"]}))


def test_train_export_adapters_and_merged_load_in_transformers(checkpoint, reference, corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": {"load": str(checkpoint)},
        "data": {"train": [str(corpus / "train.jsonl")]},
        "train": {"max_steps": 12, "max_tokens": 2000, "log_every": 1,
                  "lora": {"r": 8, "targets": ["q_proj", "v_proj", "down_proj"]}},
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
    clip = _clip(2.5, seed=3)
    batch = merged.processor.collate([merged.processor.encode_messages(_messages(clip), add_generation_prompt=True)])
    inputs = _reference_inputs(AutoProcessor.from_pretrained(run / "model"), clip)
    base = GlmAsrForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ours = merged(batch).logits
        before = reference[0](**inputs).logits
        exported = GlmAsrForConditionalGeneration.from_pretrained(run / "model").eval()(**inputs).logits
        adapted = PeftModel.from_pretrained(base, run / "adapter").eval()(**inputs).logits
    assert (ours - before).abs().max() > 1e-3  # training changed the model
    assert (ours - exported).abs().max() <= 1e-4
    assert (ours - adapted).abs().max() <= 1e-4


def test_the_openai_client_talks_to_it_through_the_server(model, checkpoint):
    config = ServeConfig(model=str(checkpoint))
    runtime = build_runtime(config, model)
    wav = encode(_clip(1.2), "wav")
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    expected = model.generate(_messages(_clip(1.2), "Hi"), max_new_tokens=6)
    try:
        with running_server(runtime, config) as url:
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            reply = client.chat.completions.create(
                model=checkpoint.name, max_tokens=6, temperature=0,
                messages=[{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}],
            )  # fmt: skip
            transcript = client.audio.transcriptions.create(model=checkpoint.name, file=("clip.wav", wav))
    finally:
        runtime.close()
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens_details.audio_tokens == model.audio_tokens(len(_clip(1.2)))
    assert isinstance(transcript.text, str)
