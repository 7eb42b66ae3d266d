"""SpeechLM: every registered family builds, trains a step and generates; audio is spliced in."""

from __future__ import annotations

import pytest
import torch

import voxtune
from voxtune.model import FAMILIES, AudioEmbedding, family_of, tiny


def _conversation(clip, reply: str | None = None) -> list[dict]:
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "What is this?"}]}
    ]
    return messages + ([{"role": "assistant", "content": reply}] if reply else [])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_runs_forward_backward_and_generate(family, make_clip):
    model = tiny(family, "streaming").train()
    assert model.lm.config.model_type == family
    batch = model.processor.collate(
        [model.processor.encode_messages(_conversation(make_clip(0.8), "A tone."), with_labels=True)]
    )
    loss = model(batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    # The gradient reaches the audio side through the spliced embeddings.
    assert model.encoder.parameters().__next__().grad is not None
    assert model.projector.gate_up.weight.grad.abs().sum() > 0
    model.eval()
    reply = model.generate(_conversation(make_clip(0.8)), max_new_tokens=5)
    assert isinstance(reply, str)
    # Every module name the registry sends LoRA to exists in this family's LM.
    names = {name.rsplit(".", 1)[-1] for name, _ in model.lm.named_modules()}
    assert set(model.family.lora_targets) <= names


def test_a_bfloat16_model_takes_float32_audio(tiny_models, make_clip):
    model = tiny("llama", "whisper").to(torch.bfloat16)
    assert isinstance(model.generate(_conversation(make_clip(0.5)), max_new_tokens=3), str)


def test_an_unknown_family_uses_defaults_and_says_so_once(caplog):
    with caplog.at_level("WARNING"):
        first, second = family_of("brand_new_lm"), family_of("brand_new_lm")
    assert first is second and first.name == "default"
    assert sum("brand_new_lm" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("encoder", ["streaming", "whisper"])
def test_encoded_audio_is_reused_without_encoding_again(tiny_models, make_clip, encoder):
    model = tiny_models("qwen2", encoder)
    audio = make_clip(1.2)
    calls = []
    hook = model.encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        embedding = model.encode_audio(audio)
        assert isinstance(embedding, AudioEmbedding) and embedding.num_tokens == model.audio_tokens(len(audio))
        assert len(calls) == 1
        with_embedding = model.generate(_conversation(embedding), max_new_tokens=8)
        assert len(calls) == 1  # the cached clip was not encoded again
        assert with_embedding == model.generate(_conversation(audio), max_new_tokens=8)
    finally:
        hook.remove()


def test_audio_changes_only_what_comes_after_it(tiny_models, make_clip):
    model = tiny_models()
    logits = []
    for seed in (0, 1):
        example = model.processor.encode_messages(_conversation(make_clip(0.8, seed)))
        with torch.no_grad():
            logits.append(model(model.processor.collate([example])).logits[0])
    ids = example.input_ids
    first_audio = ids.index(model.processor.audio_token_id)
    assert torch.equal(logits[0][:first_audio], logits[1][:first_audio])  # causal: nothing before
    assert not torch.allclose(logits[0][-1], logits[1][-1])  # the answer position hears the audio


def test_batched_training_loss_matches_per_example(tiny_models, make_clip):
    model = tiny_models("llama", "whisper")
    examples = [
        model.processor.encode_messages(_conversation(make_clip(0.6, 0), "One."), with_labels=True),
        model.processor.encode_messages(_conversation(make_clip(1.4, 1), "Two words."), with_labels=True),
    ]
    with torch.no_grad():
        together = model(model.processor.collate(examples)).logits
        for row, example in enumerate(examples):
            alone = model(model.processor.collate([example])).logits[0]
            n = len(example.input_ids)
            assert torch.allclose(together[row, :n], alone, atol=1e-5)


def test_compose_from_a_saved_lm_and_a_whisper_checkpoint(tmp_path, make_clip):
    from transformers import AutoModelForCausalLM, WhisperConfig, WhisperForConditionalGeneration

    from voxtune.model import compose
    from voxtune.model.tiny import tiny_lm_config, train_tokenizer

    tokenizer = train_tokenizer("qwen2")
    AutoModelForCausalLM.from_config(tiny_lm_config("qwen2", tokenizer)).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    whisper_config = WhisperConfig(
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    whisper = WhisperForConditionalGeneration(whisper_config)
    whisper.save_pretrained(tmp_path / "whisper")

    model = compose(tmp_path / "lm", tmp_path / "whisper").eval()
    for name, tensor in whisper.model.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], tensor), name
    assert model.config.encoder_kind == "whisper" and model.config.projector_stack == 4
    assert isinstance(model.generate(_conversation(make_clip(0.7)), max_new_tokens=4), str)
    # Past Whisper's 30 s window: read window by window, every window's frames counted.
    long = make_clip(61.0)
    assert model.audio_tokens(len(long.samples)) == 375 + 375 + 13 == len(model.encode_audio(long).embeddings)
    assert isinstance(model.generate(_conversation(long), max_new_tokens=4), str)
    model.save_pretrained(tmp_path / "speech")
    assert voxtune.load(tmp_path / "speech").config == model.config


@pytest.mark.parametrize("family, encoder", [("llama", "streaming"), ("qwen2", "whisper"), ("gemma2", "streaming")])
def test_packed_examples_give_the_same_logits_and_loss_as_separate_ones(tiny_models, make_clip, family, encoder):
    model = tiny_models(family, encoder)
    examples = [
        model.processor.encode_messages(_conversation(make_clip(0.6, 0), "One."), with_labels=True),
        model.processor.encode_messages(
            [{"role": "user", "content": "Text only."}, {"role": "assistant", "content": "Fine."}], with_labels=True
        ),
        model.processor.encode_messages(_conversation(make_clip(1.3, 1), "Three words here."), with_labels=True),
    ]
    packed = model.processor.pack(examples)
    with torch.no_grad():
        logits = model(packed).logits[0]
        start, total, count = 0, 0.0, 0
        for example in examples:
            alone = model(model.processor.collate([example]))
            n = len(example.input_ids)
            assert torch.allclose(logits[start : start + n], alone.logits[0], atol=1e-4)
            targets = sum(label != -100 for label in example.labels[1:])
            total, count = total + alone.loss * targets, count + targets
            start += n
        # The packed loss is the token-weighted mean of the separate ones.
        assert torch.allclose(model(packed).loss, total / count, atol=1e-5)


def test_pre_encoded_clips_must_fit_the_model(tiny_models):
    from voxtune.model import MessageError

    model = tiny_models()
    width = model.lm.config.hidden_size
    for bad in (torch.zeros(5, width + 1), torch.zeros(5)):
        with pytest.raises(MessageError):
            model.generate(_conversation(AudioEmbedding(bad, 0.4)), max_new_tokens=2)
    assert isinstance(
        model.generate(
            _conversation(AudioEmbedding(torch.zeros(5, width, dtype=torch.float64), 0.4)), max_new_tokens=2
        ),
        str,
    )


def test_encode_audio_takes_what_load_takes_and_checks_it(tiny_models, tmp_path, make_clip):
    import soundfile as sf

    from voxtune.audio import AudioError

    model = tiny_models("qwen2", "whisper")
    clip = make_clip(0.9)
    sf.write(tmp_path / "clip.wav", clip.samples, 16000, subtype="FLOAT")
    assert torch.equal(model.encode_audio(tmp_path / "clip.wav").embeddings, model.encode_audio(clip).embeddings)
    assert model.encode_audio(make_clip(31.0)).num_tokens == model.audio_tokens(31 * 16000) == 375 + 13
    # With LoRA on the encoder (peft wraps it), long clips are still read in windows.
    model.add_adapters(["q_proj", "v_proj"], ["q_proj", "v_proj"], r=2, lora_alpha=4)
    assert model.encode_audio(make_clip(31.0)).num_tokens == 375 + 13
    with pytest.raises(AudioError, match="too short"):
        model.encode_audio(make_clip(0.005))


def test_conversations_and_prompts_are_checked(tiny_models, make_clip):
    from voxtune.model import MessageError, SamplingError

    model = tiny_models()
    with pytest.raises(MessageError, match="no conversation"):
        model.generate([])
    with pytest.raises(MessageError, match="at most"):
        model.generate([{"role": "user", "content": "word " * 600}], max_new_tokens=2000)
    with pytest.raises(MessageError, match="no language tag"):
        model.transcribe(make_clip(0.5), language="klingon")
    for bad in ({"temperature": "1"}, {"seed": 1.5}, {"max_new_tokens": None}):
        with pytest.raises(SamplingError):
            model.generate(_conversation(make_clip(0.5)), **bad)
    # A vanishing temperature is greedy, not an overflow.
    assert model.generate(_conversation(make_clip(0.5)), temperature=1e-300, max_new_tokens=5) == model.generate(
        _conversation(make_clip(0.5)), max_new_tokens=5
    )


def test_a_base_tokenizer_gets_the_family_markers_as_single_tokens():
    from voxtune.model import prepare_tokenizer
    from voxtune.model.tiny import train_tokenizer

    tokenizer = train_tokenizer("qwen2")  # has ChatML markers, none of Llama 3's
    prepare_tokenizer(tokenizer, "llama")
    for marker in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1


def test_a_tiny_model_can_stack_more_frames_per_audio_token(make_clip):
    from voxtune.model import tiny

    default, coarse = tiny(), tiny(projector_stack=4)
    assert default.config.projector_stack == 2 and coarse.config.projector_stack == 4
    # 25 encoder frames per second: 12.5 audio tokens per second by default, 6.25 with 4.
    assert default.audio_tokens(32000) == 25 and coarse.audio_tokens(32000) == 13
    messages = [{"role": "user", "content": [{"type": "audio", "audio": make_clip(2.0)}]}]
    assert len(coarse.processor.encode_messages(messages).clips) == 1
    assert coarse.generate(messages, max_new_tokens=2) is not None
