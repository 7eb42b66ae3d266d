"""What `voxtune serve` is configured by: one typed schema (a YAML file and dotted overrides)."""

from __future__ import annotations

from pydantic import Field, field_validator

from voxtune.config import Config


class Limits(Config):
    """What one request, and the server as a whole, may take on."""

    max_body_mb: float = Field(25.0, gt=0)  # request body (OpenAI's upload limit is 25 MB)
    max_audio_seconds: float = Field(600.0, gt=0)  # audio per request, stored clips included
    max_tokens: int = Field(1024, ge=1)  # tokens per reply; also the default when a request names none
    max_concurrent: int = Field(64, ge=1)  # requests in flight; beyond it, 429 with Retry-After
    # Requests in flight from one caller (an API key; without keys, an address): nobody can
    # take every slot. None: half of max_concurrent.
    max_concurrent_per_client: int | None = Field(None, ge=1)
    max_connections: int = Field(512, ge=1)  # open connections, idle ones included; beyond it, 503
    max_realtime_sessions: int = Field(32, ge=1)  # /v1/realtime WebSockets open at once
    max_batch: int = Field(32, ge=1)  # conversations decoded together
    max_speech_chars: int = Field(4096, ge=1)  # /v1/audio/speech input, as OpenAI
    body_timeout_seconds: float = Field(30.0, gt=0)  # a body that takes longer to arrive: 408
    # A connection whose request line and headers take longer to arrive is closed.
    header_timeout_seconds: float = Field(10.0, gt=0)
    # A response the client does not read for this long is abandoned (its connection closed,
    # its generation stopped, its slot freed).
    write_timeout_seconds: float = Field(30.0, gt=0)
    # On SIGTERM / Ctrl-C: how long requests in flight may take to finish. A stream still
    # running just before the end gets an error event and [DONE]; nothing new is accepted.
    shutdown_timeout_seconds: float = Field(30.0, ge=0)

    @property
    def per_client(self) -> int:
        """The requests one caller may have in flight."""
        return self.max_concurrent_per_client or max(1, self.max_concurrent // 2)


class ServeConfig(Config):
    """The server: which model, where it listens, who may call it, and its limits."""

    model: str | None = None  # a model directory or Hugging Face repo id; None: the built-in model
    model_id: str | None = None  # the id /v1/models lists; default: the model's folder name
    # Other model names a request may use for this model (clients that hard-code OpenAI's).
    aliases: list[str] = [
        "gpt-4o-audio-preview",
        "gpt-4o-mini-audio-preview",
        "gpt-audio",
        "gpt-audio-mini",
        "whisper-1",
        "gpt-4o-transcribe",
        "gpt-4o-mini-transcribe",
        "tts-1",
        "tts-1-hd",
        "gpt-4o-mini-tts",
    ]
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = []  # empty: no authentication
    access_log: bool = False  # a line per request on the console (uvicorn's access log)
    audio_ttl_seconds: float = Field(3600.0, gt=0)  # how long an audio id stays valid
    audio_store_mb: float = Field(256.0, gt=0)  # memory for stored clips and replies (LRU beyond it)
    # Realtime sessions with server VAD start a turn's reply when the speech pauses, while the
    # silence that ends the turn runs; off: when the turn has ended (as a benchmark's baseline).
    realtime_early_replies: bool = True
    limits: Limits = Limits()

    @field_validator("api_keys")
    @classmethod
    def _keys_are_not_blank(cls, keys: list[str]) -> list[str]:
        if any(not key.strip() for key in keys):
            raise ValueError("an API key may not be empty (it would let nobody in)")
        return keys
