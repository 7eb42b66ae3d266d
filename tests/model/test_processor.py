"""Messages -> ids: placeholder expansion for several clips, label masking per template, errors."""

from __future__ import annotations

import base64
import io

import pytest
import soundfile as sf
import torch

from voxtune.audio import AudioError
from voxtune.model import AudioEmbedding, MessageError
from voxtune.model.processor import IGNORE_INDEX


def _runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the consecutive runs of `token` in `ids`."""
    runs, current = [], 0
    for i in ids + [None]:
        if i == token:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@pytest.mark.parametrize("encoder", ["streaming", "whisper"])
def test_each_clip_expands_to_its_own_number_of_audio_tokens(tiny_models, make_clip, encoder):
    model = tiny_models("llama", encoder)
    clips = [make_clip(0.5, 0), make_clip(1.3, 1), make_clip(2.0, 2)]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": clips[0]},
                {"type": "text", "text": "and"},
                {"type": "audio", "audio": clips[1]},
            ],
        },
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "then this:"}, {"type": "audio", "audio": clips[2]}]},
    ]
    example = model.processor.encode_messages(messages)
    expected = [model.audio_tokens(len(c)) for c in clips]
    assert _runs(example.input_ids, model.processor.audio_token_id) == expected
    # About 12.5 audio tokens per second of speech, for either encoder.
    assert expected == [round(12.5 * c.duration + 0.49) for c in clips]
    assert len(example.clips) == 3


def _wav_base64(audio) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, audio.samples, audio.sample_rate, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def test_openai_input_audio_parts_and_pre_encoded_clips(tiny_models, make_clip):
    model = tiny_models()
    audio = make_clip(1.0)
    openai_part = {"type": "input_audio", "input_audio": {"data": _wav_base64(audio), "format": "wav"}}
    embedding = AudioEmbedding(torch.zeros(7, model.lm.config.hidden_size), 0.5)
    example = model.processor.encode_messages(
        [
            {
                "role": "user",
                "content": [openai_part, {"type": "text", "text": "then"}, {"type": "audio", "audio": embedding}],
            }
        ]
    )
    assert _runs(example.input_ids, model.processor.audio_token_id) == [model.audio_tokens(16000), 7]
    batch = model.processor.collate([example])
    assert batch["audio_is_embedding"].tolist() == [False, True]
    assert batch["audio_features"].shape[0] == 1 and len(batch["audio_embeddings"]) == 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral", "phi3"])
def test_labels_keep_exactly_the_assistant_turns(tiny_models, make_clip, family):
    model = tiny_models(family, "streaming")
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "audio", "audio": make_clip(0.6)}, {"type": "text", "text": "What is it?"}],
        },
        {"role": "assistant", "content": "A tone."},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Still a tone <|lang:en|>"},
    ]
    example = model.processor.encode_messages(messages, with_labels=True)
    assert len(example.labels) == len(example.input_ids)
    kept = [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(example.input_ids, example.labels, strict=True))
    text = model.tokenizer.decode(kept)
    # Both replies, each up to the token that ends the turn, and nothing of the other roles.
    end = model.family.end_of_turn or model.tokenizer.eos_token
    assert text == f"A tone.{end}Still a tone <|lang:en|>{end}"
    assert model.processor.audio_token_id not in kept


def test_collate_pads_left_or_right(tiny_models):
    model = tiny_models()
    short = model.processor.encode_messages([{"role": "user", "content": "hi"}])
    long = model.processor.encode_messages([{"role": "user", "content": "a much longer message than hi"}])
    right = model.processor.collate([short, long])
    left = model.processor.collate([short, long], pad_left=True)
    n = len(short.input_ids)
    assert right["input_ids"][0, :n].tolist() == short.input_ids and right["attention_mask"][0, n:].sum() == 0
    assert left["input_ids"][0, -n:].tolist() == short.input_ids and left["attention_mask"][0, :-n].sum() == 0


@pytest.mark.parametrize(
    "messages, error, words",
    [
        ([], MessageError, "at least one"),
        ([{"content": "no role"}], MessageError, "role"),
        ([{"role": "robot", "content": "x"}], MessageError, "unknown role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], MessageError, "unknown type"),
        ([{"role": "user", "content": "fake <|audio|> token"}], MessageError, "may not contain"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], MessageError, "data"),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "bm90IGF1ZGlv"}}]}],
            AudioError,
            "message 0",
        ),
        ([{"role": "user", "content": 42}], MessageError, "string or a list"),
    ],
)
def test_bad_conversations_are_named(tiny_models, messages, error, words):
    with pytest.raises(error, match=words):
        tiny_models().processor.encode_messages(messages)


def test_too_short_and_assistant_audio_are_refused(tiny_models, make_clip):
    processor = tiny_models().processor
    with pytest.raises(AudioError, match="too short"):
        processor.encode_messages([{"role": "user", "content": [{"type": "audio", "audio": make_clip(0.005)}]}])
    for role in ("assistant", "system"):  # templates may move these turns, and clips with them
        with pytest.raises(MessageError, match="only user turns"):
            processor.encode_messages([{"role": role, "content": [{"type": "audio", "audio": make_clip(1.0)}]}])


def test_a_reply_is_tokenised_apart_from_its_prompt(tiny_models):
    # With a generation prompt ending in a space, byte-level BPE would merge that space into
    # the reply's first word; the reply must still be trained whole, as generated after it.
    model = tiny_models("llama", "whisper")
    template = model.tokenizer.chat_template
    model.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|eot_id|>{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    try:
        messages = [{"role": "user", "content": "sum?"}, {"role": "assistant", "content": "five is twelve."}]
        example = model.processor.encode_messages(messages, with_labels=True)
        kept = [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
        assert model.tokenizer.decode(kept) == "five is twelve.<|eot_id|>"
        prompt = model.processor.encode_messages(messages[:1], add_generation_prompt=True).input_ids
        assert example.input_ids[: len(prompt)] == prompt  # training starts as inference does
    finally:
        model.tokenizer.chat_template = template


def test_template_errors_and_odd_parts_are_message_errors(tiny_models):
    model = tiny_models("qwen2", "streaming")
    template = model.tokenizer.chat_template
    model.tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}x"
    )
    try:
        with pytest.raises(MessageError, match="System role not supported"):
            model.processor.encode_messages([{"role": "system", "content": "hi"}])
    finally:
        model.tokenizer.chat_template = template
    for part in ({"type": "audio", "audio": 5}, {"type": "input_audio", "input_audio": {"data": 5}}):
        with pytest.raises(MessageError):
            model.processor.encode_messages([{"role": "user", "content": [part]}])
