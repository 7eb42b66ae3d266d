"""Audio Flamingo 3 and Music Flamingo read from their own checkpoints: the same numbers as
their transformers classes and processors (clips longer than a window included), LoRA on the LM
alone, adapters and merged exports that transformers + peft load, `voxtune train` and the
OpenAI server on it. The checkpoints are tiny random ones with a 1 s window, built here."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
import transformers
from openai import OpenAI
from peft import PeftModel
from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

import voxtune
from voxtune.audio import Audio, AudioTooLongError, encode
from voxtune.cli import main
from voxtune.model.architectures.pretrained import PretrainedSpeechLM
from voxtune.model.architectures.tiny import tiny_checkpoint
from voxtune.serve.config import ServeConfig
from voxtune.serve.server import build_runtime, running_server
from voxtune.train.model_setup import prepare_trainable
from voxtune.train.recipe import TrainSection

LM_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENCODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
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


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(loaded):
    name, model, hf, processor = loaded
    assert isinstance(model, PretrainedSpeechLM) and model.family.name == "qwen2" and model.architecture == name
    marked = "<|sound_bos|><sound><|sound_eos|>" if name == "musicflamingo" else "<sound>"
    assert model.processor.audio_text == marked
    clip = _clip(2.3)  # three 1 s windows
    messages = _messages(clip)
    example = model.processor.encode_messages(messages, add_generation_prompt=True)
    inputs = _reference_inputs(processor, clip)
    assert inputs["input_features"].shape == (3, 128, 100)
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


# 1.23457 s: not whole hops, two windows; 2.3 s: three windows; 3.0001 s: a last window of one
# frame, which gives no token.
@pytest.mark.parametrize("seconds", [0.2, 1.0, 1.23457, 2.3, 3.0001])
def test_placeholder_counts_match_the_processor_and_the_encoder(loaded, seconds):
    name, model, hf, processor = loaded
    clip = _clip(seconds)
    inputs = _reference_inputs(processor, clip)
    expected = int((inputs["input_ids"] == hf.config.audio_token_id).sum())
    features, frames = model.featurize([clip.samples])
    assert int(frames[0]) == int(inputs["input_features_mask"].sum())
    (embeddings,) = model.embed_audio(features, frames)
    assert model.audio_tokens(len(clip)) == expected == embeddings.shape[0]
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
    clips = [_clip(1.23457).samples, _clip(0.3, seed=1).samples, _clip(2.5, seed=2).samples]
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
        model.processor.encode_messages(_messages(silence))


def test_transcripts_are_asked_and_read_as_the_processor_does(loaded):
    name, model, _, processor = loaded
    clip = _clip(1.0)
    (turn,) = model.transcription_messages(clip)
    if name == "musicflamingo":  # its processor has no transcription prompt: voxtune's plain request
        assert turn["content"][1] == PretrainedSpeechLM.transcription_messages(model, clip)[0]["content"][1]
        return
    assert turn["content"][1] == {"type": "text", "text": processor.default_transcription_prompt}
    replies = ['The spoken content of the audio is "hello there".', "The transcription of the audio is 'a b'.",
               "Plain words.", '"quoted"']  # fmt: skip
    for reply in replies:
        assert model.read_transcript(reply) == (processor._strip_assistant_prefix_and_quotes(reply), None)
    # Partial replies (streamed): nothing while the framing is written, then the words so far.
    partial = [model.read_transcript(r)[0] for r in ("The spoken con", 'The spoken content of the audio is "hel')]
    assert partial == ["", "hel"]


def test_lora_lands_on_the_lm_only_unless_the_encoder_is_asked(loaded, checkpoints):
    path = checkpoints[loaded[0]]
    model = voxtune.load(str(path))
    params = prepare_trainable(model, TrainSection(method="lora"))
    targeted = set(model._peft.base_model.targeted_module_names)
    leaves = [f"self_attn.{name}" for name in LM_LAYERS[:4]] + [f"mlp.{name}" for name in LM_LAYERS[4:]]
    expected = {f"model.language_model.layers.{i}.{leaf}" for i in range(2) for leaf in leaves}
    assert targeted == expected
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert len(params) == 2 * len(expected)  # A and B of each, the projector stays as it is
    batch = model.processor.collate([model.processor.encode_messages(
        _messages(_clip(1.5)) + [{"role": "assistant", "content": "hello"}], with_labels=True)])  # fmt: skip
    model(batch).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    with_encoder = voxtune.load(str(path))
    prepare_trainable(with_encoder, TrainSection(method="lora", lora={"encoder": True}, train_projector=True))
    targeted = set(with_encoder._peft.base_model.targeted_module_names)
    tower = {name for name in targeted if name.startswith("model.audio_tower.")}
    assert tower == {f"model.audio_tower.layers.{i}.{leaf}" for i in range(2) for leaf in ENCODER}
    assert targeted - tower == expected
    assert all(p.requires_grad for p in with_encoder.projector.parameters())


def test_train_export_adapters_and_merged_load_in_transformers(checkpoint, corpus, tmp_path):
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

    merged = voxtune.load(str(run / "model"))
    clip = _clip(1.5, seed=3)
    batch = merged.processor.collate([merged.processor.encode_messages(_messages(clip), add_generation_prompt=True)])
    inputs = _reference_inputs(AutoProcessor.from_pretrained(run / "model"), clip)
    base = AudioFlamingo3ForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ours = merged(batch).logits
        before = base(**inputs).logits
        exported = AudioFlamingo3ForConditionalGeneration.from_pretrained(run / "model").eval()(**inputs).logits
        adapted = PeftModel.from_pretrained(base, run / "adapter").eval()(**inputs).logits
    assert (ours - before).abs().max() > 1e-3  # training changed the model
    assert (ours - exported).abs().max() <= 1e-4
    assert (ours - adapted).abs().max() <= 1e-4


def test_the_openai_client_talks_to_it_through_the_server(checkpoint):
    model = voxtune.load(str(checkpoint))
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
