"""The Realtime API's shapes: a session's configuration (its defaults and checks), the items a
client may add to the conversation, ids, and the error a bad client event becomes."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from voxtune.errors import InputError
from voxtune.serve.realtime import formats
from voxtune.serve.realtime.vad import EAGERNESS_SILENCE_MS

if TYPE_CHECKING:
    from voxtune.serve.realtime.session import Session


def new_id(prefix: str) -> str:
    """A new id for a session, item, response or event: `prefix` and 20 hex digits."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def default_session(model_id: str, kind: str = "realtime") -> dict[str, Any]:
    """A new session's configuration, as `session.created` shows it."""
    turn_detection = {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "create_response": True,
        "interrupt_response": True,
        "idle_timeout_ms": None,
    }
    audio_input = {
        "format": {"type": "audio/pcm", "rate": formats.PCM_RATE},
        "transcription": None,
        "noise_reduction": None,
        "turn_detection": turn_detection,
    }
    if kind == "transcription":
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": new_id("sess"),
            "audio": {"input": {**audio_input, "transcription": {"model": model_id}}},
            "include": [],
        }
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": new_id("sess"),
        "model": model_id,
        "output_modalities": ["audio"],
        "instructions": "",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "audio": {
            "input": audio_input,
            "output": {"format": {"type": "audio/pcm", "rate": formats.PCM_RATE}, "voice": "alloy", "speed": 1.0},
        },
    }


class EventError(InputError):
    """A client event that cannot be done; it becomes an `error` event."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


def merge(config: dict, update: dict) -> None:
    """`update` into `config`, nested objects merged key by key (omitted keys keep their values)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merge(config[key], value)
        else:
            config[key] = value


def check_session(config: dict) -> None:
    """Raise `EventError` for a session configuration voxtune cannot serve."""
    audio = config.get("audio")
    if not isinstance(audio, dict) or not isinstance(audio.get("input"), dict):
        raise EventError("session.audio.input must be an object", param="session.audio")
    for side in ("input", "output"):
        fmt = (audio.get(side) or {}).get("format")
        if fmt is None and side == "output" and config["type"] == "transcription":
            continue
        if not isinstance(fmt, dict) or fmt.get("type") not in formats.FORMATS:
            raise EventError(
                f"audio.{side}.format.type must be one of {', '.join(formats.FORMATS)}",
                param=f"session.audio.{side}.format",
            )
        if fmt["type"] == "audio/pcm" and fmt.get("rate", formats.PCM_RATE) != formats.PCM_RATE:
            raise EventError("audio/pcm is 24000 Hz only, as OpenAI's", param=f"session.audio.{side}.format.rate")
    detection = audio["input"].get("turn_detection")
    if detection is not None:
        if not isinstance(detection, dict) or detection.get("type") not in ("server_vad", "semantic_vad"):
            raise EventError(
                "turn_detection.type must be server_vad or semantic_vad (or turn_detection null)",
                param="session.audio.input.turn_detection",
            )
        threshold = detection.get("threshold", 0.5)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold < 1:
            raise EventError(
                "turn_detection.threshold must be between 0 and 1", param="session.audio.input.turn_detection.threshold"
            )
        idle = detection.get("idle_timeout_ms")
        if idle is not None and (not isinstance(idle, int) or isinstance(idle, bool) or idle < 0):
            raise EventError(
                "turn_detection.idle_timeout_ms must be a whole number of ms (or null)",
                param="session.audio.input.turn_detection.idle_timeout_ms",
            )
        if detection.get("eagerness", "auto") not in EAGERNESS_SILENCE_MS:
            raise EventError(
                "turn_detection.eagerness must be low, medium, high or auto",
                param="session.audio.input.turn_detection.eagerness",
            )
    if config["type"] == "realtime":
        modalities = config.get("output_modalities")
        if modalities not in (["audio"], ["text"]):
            raise EventError("output_modalities must be ['audio'] or ['text']", param="session.output_modalities")
        voice = audio.get("output", {}).get("voice")
        name = voice.get("id") if isinstance(voice, dict) else voice
        if not isinstance(name, str):
            raise EventError(
                "audio.output.voice must be a voice name (or {'id': name})", param="session.audio.output.voice"
            )
        from voxtune.audio import voices

        try:
            voices.default_backend().resolve_voice(name)
        except voices.VoiceError as error:
            raise EventError(str(error), param="session.audio.output.voice") from None


def conversation_item(item: dict, session: Session) -> dict:
    """A client's item, checked and completed with ids (user audio decoded into the session)."""
    kind = item.get("type", "message")
    out = {"id": item.get("id") or new_id("item"), "type": kind, "object": "realtime.item", "status": "completed"}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
            raise EventError("a function_call_output item needs 'call_id' and 'output' strings", param="item")
        return {**out, "call_id": item["call_id"], "output": item["output"]}
    if kind == "function_call":
        if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
            raise EventError("a function_call item needs 'call_id', 'name' and 'arguments' strings", param="item")
        return {**out, "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
    if kind != "message" or item.get("role") not in ("user", "assistant", "system"):
        raise EventError(
            "item.type must be message (role user, assistant or system), function_call or function_call_output",
            param="item",
        )
    content = []
    for index, part in enumerate(item.get("content") or []):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype in ("input_text", "text", "output_text") and isinstance(part.get("text"), str):
            content.append(
                {"type": "input_text" if item["role"] != "assistant" else "output_text", "text": part["text"]}
            )
        elif ptype == "input_audio" and item["role"] == "user" and isinstance(part.get("audio"), str):
            samples = formats.decode_wire(part["audio"], session.input_format)
            session.audio[out["id"]] = formats.to_model_rate(samples, session.input_format)
            content.append({"type": "input_audio", "transcript": part.get("transcript")})
        elif ptype in ("audio", "output_audio") and item["role"] == "assistant":
            content.append({"type": "output_audio", "transcript": part.get("transcript") or ""})
        else:
            raise EventError(f"item.content[{index}] is not a part this role can hold", param=f"item.content[{index}]")
    if not content:
        raise EventError("a message item needs content", param="item.content")
    return {**out, "role": item["role"], "content": content}
