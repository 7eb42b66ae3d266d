"""The OpenAI chat wire format: `messages` as pydantic models, turned into voxtune's own
conversation (`voxtune.infer.conversation`) for the runtime.

Roles: system and developer (text), user (text and `input_audio` parts: base64 `data` with
`format`, or the `id` of a clip an earlier request stored), assistant (text or refusal parts,
or `audio: {id}` naming an earlier spoken reply, and `tool_calls`), tool (text). Types are
strict, as OpenAI's are. A bad message is a 400 naming its place, e.g.
`messages[0].content[1].input_audio.format`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from voxtune.infer.conversation import Clip, Part, StoredClip, Text, Turn
from voxtune.infer.runtime import INPUT_FORMATS
from voxtune.serve.errors import from_validation_error

__all__ = ["conversation", "parse_messages"]


class _Wire(BaseModel):
    # Fields voxtune does not read (name, annotations...) are accepted and ignored.
    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class RefusalPart(_Wire):
    type: Literal["refusal"]
    refusal: str


class InputAudio(_Wire):
    data: str | None = None
    format: str | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _data_or_id(self) -> InputAudio:
        if self.data is None and self.id is None:
            raise ValueError("give data (base64 audio) with its format, or the id of a stored clip")
        if self.format is not None and self.format not in INPUT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(INPUT_FORMATS)}")
        return self


class AudioPart(_Wire):
    type: Literal["input_audio"]
    input_audio: InputAudio


class OtherMediaPart(_Wire):
    """Images and files: named in the error, which says what this model reads."""

    type: Literal["image_url", "input_image", "file"]

    @model_validator(mode="after")
    def _refuse(self) -> OtherMediaPart:
        raise ValueError(f"this model reads text and audio, not {self.type}")


def _parts(value: Any) -> Any:
    """A string content is one text part."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


UserPart = Annotated[TextPart | AudioPart | OtherMediaPart, Field(discriminator="type")]
TextOnly = Annotated[list[TextPart], BeforeValidator(_parts)]


class SystemMessage(_Wire):
    role: Literal["system", "developer"]
    content: TextOnly


class UserMessage(_Wire):
    role: Literal["user"]
    content: Annotated[list[UserPart], BeforeValidator(_parts), Field(min_length=1)]


class ReplyAudio(_Wire):
    id: str


class ToolFunction(_Wire):
    name: str
    arguments: str


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: ToolFunction


class AssistantMessage(_Wire):
    role: Literal["assistant"]
    content: Annotated[list[Annotated[TextPart | RefusalPart, Field(discriminator="type")]], BeforeValidator(_parts)]
    audio: ReplyAudio | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_content(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("content") is None:
            return {**data, "content": []}  # a reply that was only tool calls, or audio
        return data


class ToolMessage(_Wire):
    role: Literal["tool"]
    content: TextOnly
    tool_call_id: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]
_MESSAGES = TypeAdapter(Annotated[list[Message], Field(min_length=1)])
# The tags of the unions above: pydantic writes the one it took into an error's location.
_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "refusal", "input_audio", "image_url"}
_TAGS |= {"input_image", "file"}


def parse_messages(raw: Any) -> list[Turn]:
    """The request's `messages` as voxtune's conversation; a 400 naming the first bad field."""
    try:
        messages = _MESSAGES.validate_python(raw)
    except ValidationError as error:
        raise from_validation_error(error, prefix="messages", tags=_TAGS) from None
    return conversation(messages)


def conversation(messages: list[SystemMessage | UserMessage | AssistantMessage | ToolMessage]) -> list[Turn]:
    """Checked wire messages as `Turn`s (developer is system; refusals are the reply's text)."""
    turns = []
    for message in messages:
        if isinstance(message, UserMessage):
            turns.append(Turn("user", tuple(_user_part(p) for p in message.content)))
        elif isinstance(message, AssistantMessage):
            texts = tuple(Text(p.text if isinstance(p, TextPart) else p.refusal) for p in message.content)
            calls = tuple(c.model_dump() for c in message.tool_calls or ())
            turns.append(Turn("assistant", texts, message.audio.id if message.audio else None, calls))
        else:
            role: Literal["system", "tool"] = "tool" if isinstance(message, ToolMessage) else "system"
            turns.append(Turn(role, tuple(Text(p.text) for p in message.content)))
    return turns


def _user_part(part: TextPart | AudioPart | OtherMediaPart) -> Part:
    if isinstance(part, TextPart):
        return Text(part.text)
    assert isinstance(part, AudioPart)  # other media are refused by their model
    audio = part.input_audio
    if audio.data is None:
        assert audio.id is not None  # InputAudio asks for one of them
        return StoredClip(audio.id)
    return Clip(audio.data, audio.format)
