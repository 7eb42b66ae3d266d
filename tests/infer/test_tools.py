"""Function calling as text: offered in a system message, parsed back into OpenAI tool calls."""

from __future__ import annotations

import json

import pytest

from voxtune.infer.tools import ToolError, parse_tool_calls, render_tool_calls, tools_prompt

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_a_call_round_trips():
    text = render_tool_calls(
        [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    )
    rest, calls = parse_tool_calls("Let me check. " + text)
    assert rest == "Let me check."
    assert calls[0]["function"]["name"] == "get_weather" and json.loads(calls[0]["function"]["arguments"]) == {
        "city": "Oslo"
    }
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


def test_malformed_calls_stay_text():
    rest, calls = parse_tool_calls("<tool_call>{oops</tool_call>")
    assert calls == [] and rest == "<tool_call>{oops</tool_call>"


def test_the_prompt_lists_the_tools_and_the_choice():
    prompt = tools_prompt(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert '"name": "get_weather"' in prompt and "must call the function get_weather" in prompt
    assert "at least one" in tools_prompt(TOOLS, "required")
    with pytest.raises(ToolError):
        tools_prompt(TOOLS, {"type": "function", "function": {"name": "other"}})
    with pytest.raises(ToolError):
        tools_prompt([{"type": "code_interpreter"}])
