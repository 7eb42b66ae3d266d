"""The special tokens voxtune adds to every LM's tokenizer: the audio placeholder and tags.

Kept free of heavy imports: data readers check labels against these lists too.

Tags are what the model reads or writes about speech beyond its words: which language is
spoken, how it sounds, what the speaker wants, and which task is asked. Each is one token, so
the model can emit a tag in one step and a caller can parse it without fuzzy matching.
"""

from __future__ import annotations

import re

AUDIO_TOKEN = "<|audio|>"

LANGUAGES = (
    "en",
    "de",
    "fr",
    "es",
    "it",
    "pt",
    "nl",
    "sv",
    "da",
    "nb",
    "fi",
    "pl",
    "cs",
    "sk",
    "hu",
    "ro",
    "bg",
    "el",
    "ru",
    "uk",
    "tr",
    "ar",
    "he",
    "fa",
    "hi",
    "bn",
    "ur",
    "ta",
    "te",
    "mr",
    "zh",
    "ja",
    "ko",
    "vi",
    "th",
    "id",
    "ms",
    "sw",
    "af",
    "ca",
)
STYLES = ("neutral", "happy", "sad", "angry", "calm", "excited", "whisper")
INTENTS = ("question", "command", "statement")
TASKS = ("transcribe", "language", "describe", "answer", "segments")


def tag(kind: str, value: str) -> str:
    """The token for one tag, e.g. `tag("lang", "en") == "<|lang:en|>"`."""
    return f"<|{kind}:{value}|>"


def special_tokens() -> list[str]:
    """Every token voxtune adds, in a fixed order (the order sets their ids in a new vocabulary)."""
    return (
        [AUDIO_TOKEN]
        + [tag("lang", code) for code in LANGUAGES]
        + [tag("style", name) for name in STYLES]
        + [tag("intent", name) for name in INTENTS]
        + [tag("task", name) for name in TASKS]
    )


_TAG = re.compile(r"<\|[a-z]+:[^|<>]*\|>")


def strip_tags(text: str) -> str:
    """`text` without tag tokens (e.g. a transcript without its language tag)."""
    return _TAG.sub("", text).strip()


def tag_values(text: str, kind: str) -> list[str]:
    """The values of the `kind` tags in `text`, in order (`<|style:happy|>` -> "happy")."""
    return re.findall(rf"<\|{kind}:([^|<>]*)\|>", text)
