"""Function calling as text, the same for every LM: tools are described in a system message and
the model calls one by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(the Hermes convention, which Qwen and many open models are trained on).

Rendering earlier calls and tool results the same way keeps a multi-turn conversation in the
form the model learned; parsing turns the reply back into OpenAI `tool_calls`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from typing import Any

from voxtune.errors import InputError, echo

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ToolError(InputError):
    """Tools or a tool choice that cannot be used."""


def tools_prompt(tools: Sequence[dict], tool_choice: Any = "auto") -> str:
    """The system text that offers `tools` (OpenAI function tools) under `tool_choice`."""
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        functions.append({k: function[k] for k in ("name", "description", "parameters") if k in function})
    names = [f["name"] for f in functions]
    lines = [
        "You may call these functions. To call one, reply with "
        '<tool_call>{"name": <function name>, "arguments": <arguments as JSON>}</tool_call>.',
        "<tools>",
        *(json.dumps(f, ensure_ascii=False) for f in functions),
        "</tools>",
    ]
    if tool_choice == "required":
        lines.append("You must call at least one of these functions.")
    elif isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise ToolError(f"tool_choice names {echo(name)}, which is not among the tools")
        lines.append(f"You must call the function {name}.")
    elif tool_choice not in ("auto", None):
        raise ToolError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
        )
    return "\n".join(lines)


def render_tool_calls(calls: Sequence[dict]) -> str:
    """An assistant turn's OpenAI `tool_calls` as the text the model writes for them."""
    if not isinstance(calls, list):
        raise ToolError("tool_calls must be a list")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError("each tool call needs function.name and function.arguments")
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            raise ToolError(f"tool call {echo(function['name'])} has arguments that are not JSON") from None
        out.append(
            f"<tool_call>{json.dumps({'name': function['name'], 'arguments': parsed}, ensure_ascii=False)}</tool_call>"
        )
    return "\n".join(out)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Split a reply into its text and the OpenAI `tool_calls` it makes (well-formed calls only;
    a malformed one stays in the text)."""
    calls = []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return match.group(0)
        arguments = call.get("arguments", {})
        calls.append(
            {
                "id": "call_" + secrets.token_hex(12),
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        )
        return ""

    rest = _CALL.sub(take, text).strip()
    return rest, calls
