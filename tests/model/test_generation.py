"""Generation: batched == one at a time, seeds, streaming == whole, stop strings, limits."""

from __future__ import annotations

import pytest
import torch

import voxtune
from voxtune.model import SamplingParams


def _conversations(make_clip) -> list[list[dict]]:
    return [
        [{"role": "user", "content": [{"type": "audio", "audio": make_clip(0.5, 0)}, {"type": "text", "text": "Hi?"}]}],
        [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Listen:"}, {"type": "audio", "audio": make_clip(1.7, 1)}],
            },
        ],
        [{"role": "user", "content": "Text only, and a longer prompt than the others by far."}],
    ]


@pytest.mark.parametrize("family, encoder", [("llama", "streaming"), ("qwen2", "whisper"), ("gemma2", "streaming")])
def test_batched_generation_equals_one_at_a_time(tiny_models, make_clip, family, encoder):
    model = tiny_models(family, encoder)
    conversations = _conversations(make_clip)
    together = model.generate(conversations, max_new_tokens=12)
    alone = [model.generate(c, max_new_tokens=12) for c in conversations]
    assert together == alone
    assert len(set(alone)) >= 2  # the prompts really lead to different replies


def test_seeded_sampling_is_repeatable_alone_and_in_a_batch(tiny_models, make_clip):
    model = tiny_models()
    conversations = _conversations(make_clip)
    params = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first = model.generate(conversations[1], **params)
    assert model.generate(conversations[1], **params) == first
    assert model.generate(conversations, **params)[1] == first
    others = {model.generate(conversations[1], **(params | {"seed": s})) for s in range(5)}
    assert len(others) > 1  # the seed matters


def test_streamed_pieces_add_up_to_the_generated_text(tiny_models, make_clip):
    model = tiny_models("qwen2", "whisper")
    conversation = _conversations(make_clip)[0]
    pieces = list(model.stream(conversation, max_new_tokens=16))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate(conversation, max_new_tokens=16)


def test_stop_strings_end_the_reply_before_them(tiny_models, make_clip):
    model = tiny_models()
    conversation = _conversations(make_clip)[2]
    full = model.generate(conversation, max_new_tokens=20)
    stop = full[4:6]
    assert model.generate(conversation, max_new_tokens=20, stop=[stop]) == full[: full.index(stop)]
    streamed = "".join(model.stream(conversation, max_new_tokens=20, stop=stop))
    assert streamed == full[: full.index(stop)]


def test_max_new_tokens_bounds_the_reply(tiny_models):
    model = tiny_models()
    conversation = [{"role": "user", "content": "Say something."}]
    one = model.generate(conversation, max_new_tokens=1)
    assert len(model.tokenizer(one, add_special_tokens=False)["input_ids"]) <= 1


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"temperature": -1}, {"top_p": -0.1}, {"top_p": 1.5}])
def test_bad_sampling_parameters(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_a_stop_string_before_a_held_back_character_still_stops():
    """The text after a partial UTF-8 character comes at the end of the reply, and the stop
    strings apply to it too."""
    from voxtune.model.generation import _Row

    tokenizer = voxtune.load().tokenizer
    tokens = tokenizer("Привет, как дела?", add_special_tokens=False)["input_ids"]
    row = _Row(SamplingParams(max_new_tokens=6, stop=[", "]), torch.device("cpu"))
    for token in tokens[:6]:
        row.add(token, set(), tokenizer)
        if row.done:
            break
    assert row.text == "Привет" and row.reason == "stop"
