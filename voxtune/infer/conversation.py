"""voxtune's own conversation, what `Runtime.prepare_chat` reads: turns of text and clips.

The OpenAI wire format (roles, content parts, audio ids) is checked and turned into this by
`voxtune.serve.messages`; the realtime session's items go through the same door. Turn `i` is
the request's `messages[i]` and part `j` its `content[j]`, so errors found later (a clip that
does not decode, an audio id that is not there) still name the place in the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Clip", "Part", "StoredClip", "Text", "Turn"]


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Clip:
    """A clip sent with the request: base64 audio in `format` (None: told from its bytes)."""

    data: str
    format: str | None = None


@dataclass(frozen=True)
class StoredClip:
    """A user clip an earlier request left in the audio store, by its audio id."""

    id: str


Part = Text | Clip | StoredClip


@dataclass(frozen=True)
class Turn:
    """One message. System, tool and assistant turns hold text parts only; an assistant turn
    may instead name an earlier spoken reply (`reply_id`, whose text is used) and carry the
    tool calls it made (OpenAI-shaped: {"id", "type": "function", "function": {name, arguments}})."""

    role: Literal["system", "user", "assistant", "tool"]
    parts: tuple[Part, ...] = ()
    reply_id: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()

    @property
    def text(self) -> str:
        """The turn's text parts, joined."""
        return "".join(p.text for p in self.parts if isinstance(p, Text))
