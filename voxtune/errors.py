"""The base of every error a user's input can cause (bad audio, an unknown voice, a broken
checkpoint, a malformed conversation). The CLI prints these as one line and the server turns
them into 4xx responses; any other exception is a bug."""

from __future__ import annotations

import reprlib
from typing import Any

# Echoed input is cut to about this many characters: a message must stay one line however
# large (or, through YAML aliases, exponentially nested) the input was.
ECHO_CHARS = 200

_echo = reprlib.Repr()  # keyword arguments only from Python 3.12
_echo.maxlevel = 3
_echo.maxtuple = _echo.maxlist = _echo.maxarray = _echo.maxdict = _echo.maxset = _echo.maxfrozenset = 4
_echo.maxdeque = 4
_echo.maxstring = _echo.maxother = ECHO_CHARS
_echo.maxlong = 40


class InputError(ValueError):
    """Something the caller gave cannot be used; the message says what, in one line."""


def echo(value: Any) -> str:
    """`repr(value)` bounded to about ECHO_CHARS characters, for quoting input in a message."""
    return shorten(_echo.repr(value))


def shorten(text: str) -> str:
    """`text` cut to about ECHO_CHARS characters, for quoting a name or key in a message."""
    return text if len(text) <= ECHO_CHARS + 10 else text[:ECHO_CHARS] + "..."
