"""The OpenAI chat wire format read into voxtune's conversation (voxtune.serve.messages)."""

from __future__ import annotations

import pytest

from voxtune.infer.conversation import Clip, StoredClip, Text, Turn
from voxtune.serve.errors import APIError
from voxtune.serve.messages import parse_messages


def test_every_role_and_part_becomes_a_turn():
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    turns = parse_messages(
        [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "system",
                "content": [{"type": "text", "text": "Answer "}, {"type": "text", "text": "in English."}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {"type": "input_audio", "input_audio": {"id": "audio_abc"}},
                ],
                "name": "ann",  # fields voxtune does not read are accepted
            },
            {"role": "assistant", "content": None, "audio": {"id": "audio_reply"}, "tool_calls": [call]},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
            {"role": "tool", "content": "2", "tool_call_id": "call_1"},
        ]
    )
    assert turns == [
        Turn("system", (Text("Be brief."),)),
        Turn("system", (Text("Answer "), Text("in English."))),
        Turn("user", (Text("What is this?"), Clip("UklGRg==", "wav"), StoredClip("audio_abc"))),
        Turn("assistant", (), "audio_reply", (call,)),
        Turn("assistant", (Text("I cannot."),)),
        Turn("tool", (Text("2"),)),
    ]
    assert turns[1].text == "Answer in English."


@pytest.mark.parametrize(
    "messages, param, words",
    [
        ([{"role": "wizard", "content": "hi"}], "messages[0]", "'wizard'"),
        ([{"content": "hi"}], "messages[0]", "role"),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]}],
            "messages[0].content[0].input_audio",
            "give data",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": 5}}]}],
            "messages[0].content[0].input_audio.data",
            "string",
        ),
        ([{"role": "user", "content": [{"type": "input_image"}]}], "messages[0].content[0]", "not input_image"),
        (
            [{"role": "system", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}],
            "messages[0].content[0].type",
            "'text'",
        ),
        ([{"role": "user", "content": "hi", "tool_calls": 3}, {"role": "tool"}], "messages[1].content", "required"),
    ],
)
def test_a_bad_message_is_a_400_naming_its_place(messages, param, words):
    with pytest.raises(APIError) as raised:
        parse_messages(messages)
    assert raised.value.status == 400 and raised.value.param == param
    assert raised.value.message.startswith(f"{param}: ") and words in raised.value.message
