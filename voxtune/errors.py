"""The base of every error a user's input can cause (bad audio, an unknown voice, a broken
checkpoint, a malformed conversation). The CLI prints these as one line and the server turns
them into 4xx responses; any other exception is a bug."""


class InputError(ValueError):
    """Something the caller gave cannot be used; the message says what, in one line."""
