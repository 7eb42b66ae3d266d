"""Qwen2.5-Omni and Qwen3-Omni-MoE thinkers read from their own checkpoints: the same numbers
as the thinker's transformers class, LoRA on the LM alone (attention only for the MoE), adapters
and merged exports that transformers + peft load, `voxtune train` and the OpenAI server on them.
The checkpoints are tiny random ones the tests build, in the full Omni model's layout.

The Omni processors cannot load here (their video processor needs torchvision), so the
reference inputs are built the way they would build them: the checkpoint's
WhisperFeatureExtractor with the processor class's own audio settings, the audio placeholder
repeated by the processor module's own token formula, and the tokenizer."""

from __future__ import annotations

import base64
import importlib.util
import json

import numpy as np
import pytest
import torch
from openai import OpenAI
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen3OmniMoeProcessor,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths as qwen25_tokens
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths as qwen3_tokens

import voxtune
from voxtune.audio import Audio, AudioTooLongError, encode
from voxtune.cli import main
from voxtune.model import ModelLoadError
from voxtune.model.architectures.qwen_omni import OmniAudioProcessor, OmniSpeechLM, load_omni_processor
from voxtune.model.architectures.tiny import tiny_checkpoint
from voxtune.serve.config import ServeConfig
from voxtune.serve.server import build_runtime, running_server
from voxtune.train.model_setup import prepare_trainable
from voxtune.train.recipe import TrainSection

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ENCODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")

# Per generation: the thinker's class, its processor class (for its audio settings), the
# processor's token formula, its LM family and default LM LoRA targets, and the speech-out
# parts of the full model (left unread).
GENERATIONS = {
    "qwen2_5_omni": (Qwen2_5OmniThinkerForConditionalGeneration, Qwen2_5OmniProcessor, qwen25_tokens,
                     "qwen2", ATTENTION + MLP, ("talker", "token2wav")),
    "qwen3_omni_moe": (Qwen3OmniMoeThinkerForConditionalGeneration, Qwen3OmniMoeProcessor, lambda n: qwen3_tokens(n, 50),
                       "qwen3_moe", ATTENTION, ("talker", "code2wav")),
}  # fmt: skip


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


@pytest.fixture(scope="module")
def model(checkpoint):
    return voxtune.load(str(checkpoint))


def _clip(seconds: float, seed: int = 0) -> Audio:
    rng = np.random.default_rng(seed)
    return Audio((0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)


def _messages(clip, text: str = "What is said?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": text}]}]


def _reference_inputs(kind: str, model, clip: Audio, text: str = "What is said?") -> dict:
    """What the generation's processor makes of a one-clip prompt (see the module doc)."""
    _, processor_class, tokens, *_ = GENERATIONS[kind]
    audio = model.hf_processor.feature_extractor([clip.samples], **processor_class.audio_kwargs, return_tensors="pt")
    mask = audio["attention_mask"]
    chat = model.processor._render([{"role": "user", "content": model.processor.audio_text + text}], True)
    placeholder = model.processor.audio_token
    ids = model.tokenizer(chat.replace(placeholder, placeholder * int(tokens(mask.sum(-1))[0])), return_tensors="pt")
    return {**ids, "input_features": audio["input_features"], "feature_attention_mask": mask}


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(kind, model, reference):
    assert isinstance(model, OmniSpeechLM) and model.family.name == GENERATIONS[kind][3]
    clip = _clip(2.3)
    messages = _messages(clip)
    example = model.processor.encode_messages(messages, add_generation_prompt=True)
    inputs = _reference_inputs(kind, model, clip)
    assert example.input_ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ours = model(model.processor.collate([example])).logits
        theirs = reference(**inputs).logits
    assert (ours - theirs).abs().max() <= 1e-4
    # The thinker's generate computes its 3-D TMRoPE positions; voxtune's plain ones match them.
    new = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    expected = model.tokenizer.decode(new, skip_special_tokens=True)
    assert model.generate(messages, max_new_tokens=8, ignore_eos=False) == expected
    # Batched (left-padded, clips of other lengths) gives each conversation's own reply.
    other = _messages(_clip(0.7, seed=1), "And this?")
    alone = model.generate(other, max_new_tokens=8)
    assert model.generate([messages, other], max_new_tokens=8) == [expected, alone]
    # A clip encoded once stands in for its audio.
    assert model.generate(_messages(model.encode_audio(clip)), max_new_tokens=8) == expected


# 1.2345 s: not whole hops; 7.5 s: longer than the feature extractor's 6 s window, which
# Qwen3-Omni's processor does not pad or cut to (Qwen2.5-Omni's cuts, and voxtune refuses).
@pytest.mark.parametrize("seconds", [0.2, 1.0, 1.2345, 2.55, 6.0, 7.5])
def test_placeholder_counts_match_the_processor_and_the_encoder(kind, model, reference, seconds):
    clip = _clip(seconds)
    if kind == "qwen2_5_omni" and seconds > 6:
        with pytest.raises(AudioTooLongError, match=r"takes at most 6 s per clip"):
            model.processor.encode_messages(_messages(clip))
        return
    inputs = _reference_inputs(kind, model, clip)
    expected = int((inputs["input_ids"] == reference.config.audio_token_id).sum())
    features, frames = model.featurize([clip.samples])
    (embeddings,) = model.embed_audio(features, frames)
    assert model.audio_tokens(len(clip)) == expected == embeddings.shape[0]
    with torch.no_grad():
        rows = reference.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"]).last_hidden_state
    assert (embeddings - rows).abs().max() <= 1e-5


def test_the_thinker_alone_and_a_full_model_with_speech_out_load_alike(kind, model, checkpoint, reference, tmp_path):
    """A thinker saved alone has its own model_type; a released full model also holds the
    talker's and the codec's weights, which the thinker's class leaves unread."""
    alone = tmp_path / "thinker"
    reference.save_pretrained(alone)
    model.hf_processor.save_pretrained(alone)
    assert json.loads((alone / "config.json").read_text())["model_type"] == f"{kind}_thinker"

    full = tmp_path / "full"
    full.mkdir()
    for path in checkpoint.iterdir():
        (full / path.name).write_bytes(path.read_bytes())
    weights = load_file(full / "model.safetensors")
    for part in GENERATIONS[kind][5]:
        weights[f"{part}.some_layer.weight"] = torch.ones(2, 2)
    save_file(weights, full / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**config, "enable_audio_output": True}))

    batch = model.processor.collate([model.processor.encode_messages(_messages(_clip(1.1)), add_generation_prompt=True)])
    with torch.no_grad():
        expected = model(batch).logits
        for path in (alone, full):
            assert (voxtune.load(str(path))(batch).logits - expected).abs().max() <= 1e-6


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="the Omni processor loads with torchvision")
def test_without_torchvision_the_processor_is_read_as_its_audio_half(model, checkpoint, tmp_path):
    with pytest.raises((ValueError, ImportError, AttributeError)):
        AutoProcessor.from_pretrained(checkpoint)  # its image and video halves cannot load
    # A released checkpoint's preprocessor_config.json holds the image processor's settings too.
    source = tmp_path / "source"
    source.mkdir()
    for path in checkpoint.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
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
    assert again.tokenizer.audio_token == processor.tokenizer.audio_token and again.chat_template == processor.chat_template


def test_lora_lands_on_the_lm_attention_and_mlp_it_targets_unless_the_encoder_is_asked(kind, checkpoint):
    model = voxtune.load(str(checkpoint))
    lm_targets = GENERATIONS[kind][4]
    assert model.family.lora_targets == lm_targets  # Qwen3-Omni: its experts are fused, not linear layers
    prepare_trainable(model, TrainSection(method="lora"))
    targeted = set(model._peft.base_model.targeted_module_names)
    part = {**dict.fromkeys(ATTENTION, "self_attn"), **dict.fromkeys(MLP, "mlp")}
    expected = {f"model.language_model.layers.{i}.{part[name]}.{name}" for i in range(2) for name in lm_targets}
    assert targeted == expected
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    batch = model.processor.collate([model.processor.encode_messages(
        _messages(_clip(1.0)) + [{"role": "assistant", "content": "hello"}], with_labels=True)])  # fmt: skip
    model(batch).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert len(grads) == len(expected) and all(g is not None and g.abs().sum() > 0 for g in grads)

    with_encoder = voxtune.load(str(checkpoint))
    prepare_trainable(with_encoder, TrainSection(method="lora", lora={"encoder": True}))
    targeted = set(with_encoder._peft.base_model.targeted_module_names)
    tower = {name for name in targeted if name.startswith("model.audio_tower.")}
    assert tower == {f"model.audio_tower.layers.{i}.{leaf}" for i in range(2) for leaf in ENCODER}
    assert targeted - tower == expected  # nothing of the vision tower, the experts or the routers


def test_train_export_adapters_and_merged_load_in_transformers(kind, checkpoint, reference, corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": {"load": str(checkpoint)},
        "data": {"train": [str(corpus / "train.jsonl")]},
        "train": {"max_steps": 12, "max_tokens": 2000, "log_every": 1,
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

    merged = voxtune.load(str(run / "model"))  # the thinker alone: the talker is not voxtune's to export
    thinker_class = GENERATIONS[kind][0]
    clip = _clip(1.5, seed=3)
    batch = merged.processor.collate([merged.processor.encode_messages(_messages(clip), add_generation_prompt=True)])
    inputs = _reference_inputs(kind, merged, clip)
    base = thinker_class.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ours = merged(batch).logits
        before = reference(**inputs).logits
        exported = thinker_class.from_pretrained(run / "model").eval()(**inputs).logits
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
    finally:
        runtime.close()
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens_details.audio_tokens == model.audio_tokens(len(_clip(1.2)))


def test_missing_processor_files_are_named(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (bare / name).write_bytes((checkpoint / name).read_bytes())
    with pytest.raises(ModelLoadError, match=r"has no preprocessor_config.json: the checkpoint is missing its processor files"):
        voxtune.load(str(bare))


def test_tiny_builds_the_generation_it_is_named_by(tmp_path):
    for model_type in ("qwen2_5_omni", "qwen3_omni_moe"):
        path = tiny_checkpoint(model_type, tmp_path / model_type)
        assert json.loads((path / "config.json").read_text())["model_type"] == model_type
