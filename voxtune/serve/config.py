"""What `voxtune serve` is configured by: one typed schema (a YAML file and dotted overrides)."""

from __future__ import annotations

from pydantic import Field

from voxtune.config import Config


class Limits(Config):
    """What one request, and the server as a whole, may take on."""

    max_body_mb: float = Field(25.0, gt=0)  # request body (OpenAI's upload limit is 25 MB)
    max_audio_seconds: float = Field(600.0, gt=0)  # audio per request, stored clips included
    max_tokens: int = Field(1024, ge=1)  # tokens per reply; also the default when a request names none
    max_concurrent: int = Field(64, ge=1)  # requests in flight; beyond it, 429 with Retry-After
    max_batch: int = Field(32, ge=1)  # conversations decoded together
    max_speech_chars: int = Field(4096, ge=1)  # /v1/audio/speech input, as OpenAI
    body_timeout_seconds: float = Field(30.0, gt=0)  # a body that takes longer to arrive: 408


class ServeConfig(Config):
    """The server: which model, where it listens, who may call it, and its limits."""

    model: str | None = None  # a model directory or Hugging Face repo id; None: the built-in model
    model_id: str | None = None  # the id /v1/models lists; default: the model's folder name
    # Other model names a request may use for this model (clients that hard-code OpenAI's).
    aliases: list[str] = [
        "gpt-4o-audio-preview", "gpt-4o-mini-audio-preview", "gpt-audio", "gpt-audio-mini",
        "whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "tts-1", "tts-1-hd", "gpt-4o-mini-tts",
    ]  # fmt: skip
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = []  # empty: no authentication
    audio_ttl_seconds: float = Field(3600.0, gt=0)  # how long an audio id stays valid
    audio_store_mb: float = Field(256.0, gt=0)  # memory for stored clips and replies (LRU beyond it)
    limits: Limits = Limits()
