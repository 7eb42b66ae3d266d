"""Gemma 4 (audio, vision off) read from its own checkpoint: the same numbers as its transformers
class, LoRA on the LM alone, adapters and merged exports that transformers + peft load,
`voxtune train` and the OpenAI server on it. The checkpoint is a tiny random one the tests
build and save (per-layer embeddings, sliding and KV-shared layers, logit soft-cap, tied head).

`Gemma4Processor` cannot be built here: it needs a video processor, i.e. torchvision. The
reference inputs are made as it makes them: the chat with one `<|audio|>` per clip, each
replaced by `<|audio>` + n x `<|audio|>` + `<audio|>` where n is the feature extractor's valid
frames through the two stride-2 convolutions (`Gemma4Processor.replace_audio_token`), then
tokenised; features and masks come from the checkpoint's `Gemma4AudioFeatureExtractor`."""

from __future__ import annotations

import json
import threading

import harness
import pytest
import torch
from harness import clip, messages
from transformers import AutoTokenizer, Gemma4AudioFeatureExtractor, Gemma4ForConditionalGeneration

import voxtune
from tests.waiting import wait_until
from voxtune.audio import Audio, AudioTooLongError, encode
from voxtune.infer import Engine
from voxtune.model import ModelLoadError
from voxtune.model.architectures.gemma4 import Gemma4AudioProcessor, Gemma4SpeechLM, load_gemma4_processor
from voxtune.model.architectures.tiny import tiny_checkpoint
from voxtune.model.generation import stop_token_ids
from voxtune.train.model_setup import TrainError, prepare_trainable
from voxtune.train.recipe import TrainSection

LAYERS = 4  # the tiny model's: 0 and 1 keep their keys and values, 2 and 3 reuse them
AUDIO_LINEARS = (
    "feed_forward1.ffw_layer_1",
    "feed_forward1.ffw_layer_2",
    "feed_forward2.ffw_layer_1",
    "feed_forward2.ffw_layer_2",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.post",
    "lconv1d.linear_start",
    "lconv1d.linear_end",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Gemma 4 with an audio tower and no vision tower, saved in its own layout."""
    return tiny_checkpoint("gemma4", tmp_path_factory.mktemp("gemma4") / "model")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The architecture's own transformers model, tokenizer and feature extractor."""
    config = json.loads((checkpoint / "processor_config.json").read_text())["feature_extractor"]
    return (
        Gemma4ForConditionalGeneration.from_pretrained(checkpoint).eval(),
        AutoTokenizer.from_pretrained(checkpoint),
        Gemma4AudioFeatureExtractor.from_dict(config),
    )


def _soft_tokens(mask: torch.Tensor) -> int:
    """Gemma4Processor.replace_audio_token's count: the valid frames through two stride-2 convolutions."""
    for _ in range(2):
        mask = mask[::2][: (len(mask) - 1) // 2 + 1]
    return int(mask.sum())


def _reference_inputs(model, reference, text: str, clips: list[Audio]) -> dict:
    """What Gemma4Processor makes of one user turn (`text` after the clips), see the module doc."""
    _, tokenizer, extractor = reference
    flat = [{"role": "user", "content": tokenizer.audio_token * len(clips) + text}]
    rendered = model.processor._render(flat, True)
    features = extractor([clip.samples for clip in clips], return_tensors="pt")
    pieces = rendered.split(tokenizer.audio_token)
    expanded = pieces[0]
    for mask, after in zip(features["input_features_mask"], pieces[1:], strict=True):
        expanded += tokenizer.boa_token + tokenizer.audio_token * _soft_tokens(mask) + tokenizer.eoa_token + after
    return {**tokenizer(expanded, add_special_tokens=False, return_tensors="pt"), **features}


def test_it_loads_as_a_speech_lm_with_the_same_logits_and_greedy_tokens(model, reference):
    hf, tokenizer, _ = reference
    assert isinstance(model, Gemma4SpeechLM) and model.family.name == "gemma4_text"
    assert model.lm.config.model_type == "gemma4_text" and model.family.end_of_turn == "<turn|>"
    audio = clip(2.3)
    chat = messages(audio)
    inputs = _reference_inputs(model, reference, "What is said?", [audio])
    assert inputs["input_ids"].shape[1] > 4 * hf.config.text_config.sliding_window  # the window matters
    expected = harness.assert_same_as_reference(model, hf, tokenizer, chat, inputs, max_new_tokens=12)
    # The end of a turn stops a reply, as the checkpoint's generation config says.
    assert tokenizer.convert_tokens_to_ids("<turn|>") in stop_token_ids(model)
    harness.assert_batched_and_encoded_replies(model, chat, audio, expected, max_new_tokens=12)


@pytest.mark.parametrize("seconds", [0.2, 1.0, 2.55, 6.0, 30.0])
def test_placeholder_counts_match_the_processor_and_the_encoder(model, reference, seconds):
    hf = reference[0]
    audio = clip(seconds)
    inputs = _reference_inputs(model, reference, "Hi", [audio])
    expected = int((inputs["input_ids"] == hf.config.audio_token_id).sum())
    assert expected == min(-(-int(seconds * 1000) // 40), 750)  # about ceil(ms / 40), at most 750
    harness.assert_audio_tokens(model, audio, expected)
    with torch.no_grad():
        encoded = hf.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    assert int(encoded.attention_mask.sum()) == expected


def test_a_clip_longer_than_30_seconds_is_refused(model):
    with pytest.raises(AudioTooLongError, match="at most 30 s"):
        model.processor.encode_messages(messages(clip(30.5)))


def _lm_names(layers: int = LAYERS) -> set[str]:
    """The LM's attention and MLP layers: KV-shared layers (the second half) have no k/v."""
    attention = lambda i: ("q_proj", "o_proj") + (("k_proj", "v_proj") if i < layers // 2 else ())  # noqa: E731
    return {f"model.language_model.layers.{i}.self_attn.{name}" for i in range(layers) for name in attention(i)} | {
        f"model.language_model.layers.{i}.mlp.{name}"
        for i in range(layers)
        for name in ("gate_proj", "up_proj", "down_proj")
    }


def test_lora_lands_on_the_lm_only_unless_the_encoder_is_asked(checkpoint):
    model = harness.assert_lora_targets(checkpoint, _lm_names())  # the projector stays as it is
    harness.assert_lora_b_gradients(model, harness.labelled_batch(model, messages(clip(1.0))))
    tower = {f"model.audio_tower.layers.{i}.{leaf}.linear" for i in range(2) for leaf in AUDIO_LINEARS}
    harness.assert_encoder_lora(checkpoint, tower, _lm_names())


def test_missing_lora_targets_name_the_field(checkpoint):
    model = voxtune.load(str(checkpoint))
    with pytest.raises(TrainError, match=r"train.lora.targets: the model has no modules named qkv_proj"):
        prepare_trainable(model, TrainSection(method="lora", lora={"targets": ["qkv_proj"]}))


@pytest.fixture(scope="module")
def trained(checkpoint, corpus, tmp_path_factory):
    """12 steps of LoRA on the default targets, 1000 tokens a batch: the run's folder."""
    return harness.train(checkpoint, corpus, tmp_path_factory.mktemp("train"), max_tokens=1000)


def test_training_lowers_the_loss_and_caches_the_frozen_tower(trained):
    harness.assert_trained_on_cached_features(trained)


def test_the_merged_export_and_the_adapters_load_in_transformers(checkpoint, reference, trained):
    merged = voxtune.load(str(trained / "model"))
    audio = clip(1.5, seed=3)
    inputs = _reference_inputs(merged, reference, "What is said?", [audio])
    batch = harness.prompt_batch(merged, messages(audio))
    harness.assert_exports_match(merged, batch, Gemma4ForConditionalGeneration, checkpoint, trained, inputs)


def test_the_engine_gives_each_reply_as_alone_whenever_it_joins(model):
    conversations = [messages(clip(0.4 + 0.5 * i, seed=i), "q" * (i + 1)) for i in range(4)]
    # Streamed, as the engine decodes text: piece by piece (a random model's runs of byte tokens
    # that are not UTF-8 read differently piecewise than whole).
    alone = ["".join(model.stream(c, max_new_tokens=16, ignore_eos=True)) for c in conversations]
    engine = Engine(model, max_batch=8)
    results: list = [None] * 4

    def run(i: int) -> None:
        results[i] = engine.generate(conversations[i], max_new_tokens=16, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    try:
        for thread in threads[:2]:
            thread.start()
        # The others join while those decode (their caches are joined).
        wait_until(lambda: engine.steps >= 3, "three decode steps", every=0.001)
        for thread in threads[2:]:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.close()
    assert [r.text for r in results] == alone
    assert engine.peak_batch >= 3


def test_the_openai_client_talks_to_it_through_the_server(model, checkpoint):
    expected = "".join(model.stream(messages(clip(1.2), "Hi"), max_new_tokens=6))  # decoded as the engine does
    served = harness.ask_server(model, checkpoint, encode(clip(1.2), "wav"))
    assert served.reply == expected
    assert served.audio_tokens == model.audio_tokens(len(clip(1.2)))


def test_without_torchvision_the_processor_is_read_as_tokenizer_and_feature_extractor(checkpoint, reference, tmp_path):
    processor = load_gemma4_processor(checkpoint)
    assert isinstance(processor, Gemma4AudioProcessor)
    assert processor.chat_template and processor.feature_extractor.to_dict().keys() == reference[2].to_dict().keys()
    processor.save_pretrained(tmp_path)
    written = (tmp_path / "processor_config.json").read_text()
    assert written == (checkpoint / "processor_config.json").read_text()  # as it was read
    again = Gemma4AudioProcessor.from_pretrained(tmp_path)
    text = "<|turn>user\n<|audio><|audio|><audio|>Hi<turn|>"
    assert again.tokenizer(text)["input_ids"] == reference[1](text)["input_ids"]
    assert again.chat_template == processor.chat_template


def test_a_checkpoint_with_a_vision_tower_loads_and_leaves_it_alone(tmp_path):
    path = tiny_checkpoint("gemma4", tmp_path / "with-vision", vision=True)
    model = voxtune.load(str(path))
    assert model.pretrained.model.vision_tower is not None
    audio = clip(1.0)
    hf = Gemma4ForConditionalGeneration.from_pretrained(path).eval()
    tokenizer, extractor = AutoTokenizer.from_pretrained(path), model.front_end.extractor
    inputs = _reference_inputs(model, (hf, tokenizer, extractor), "What is said?", [audio])
    with torch.no_grad():
        assert (model(harness.prompt_batch(model, messages(audio))).logits - hf(**inputs).logits).abs().max() <= 1e-4
    prepare_trainable(model, TrainSection(method="lora", lora={"encoder": True}))
    assert not any("vision" in name for name in model._peft.base_model.targeted_module_names)
    assert not any(p.requires_grad for p in model.pretrained.model.vision_tower.parameters())


def test_unreadable_checkpoints_say_what_is_wrong(checkpoint, tmp_path):
    no_audio = tmp_path / "no-audio"
    no_audio.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    (no_audio / "config.json").write_text(json.dumps({**config, "audio_config": None}))
    with pytest.raises(ModelLoadError, match=r"has no audio_config: this Gemma 4 checkpoint reads no audio"):
        voxtune.load(str(no_audio))
    bare = harness.copy_files(checkpoint, tmp_path / "bare", harness.WEIGHTS_ONLY)
    with pytest.raises(ModelLoadError, match=r"has no audio feature extractor settings"):
        voxtune.load(str(bare))
