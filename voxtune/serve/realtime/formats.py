"""The Realtime API's audio on the wire: PCM16 at 24 kHz, G.711 mu-law and A-law at 8 kHz, each
mono; turned into voxtune's 16 kHz float audio and back.

G.711 (ITU-T) is two fixed 8-bit companding curves; numpy does them exactly (PyAV's codecs would
take a container round trip for every 20 ms packet).
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from voxtune.audio import Audio
from voxtune.audio.features import SAMPLE_RATE
from voxtune.errors import InputError

PCM_RATE = 24000  # the only PCM rate the Realtime API takes
G711_RATE = 8000
FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")


def rate_of(kind: str) -> int:
    """Samples per second of a wire format."""
    return PCM_RATE if kind == "audio/pcm" else G711_RATE


def decode_wire(data: str, kind: str) -> np.ndarray:
    """Base64 audio of `kind` -> float32 samples at the format's own rate."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("audio is not valid base64") from None
    if kind == "audio/pcm":
        if len(raw) % 2:
            raise InputError("audio/pcm audio must be whole 16-bit samples (an even number of bytes)")
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    codes = np.frombuffer(raw, np.uint8)
    return _ulaw_decode(codes) if kind == "audio/pcmu" else _alaw_decode(codes)


def encode_wire(audio: Audio, kind: str) -> bytes:
    """voxtune audio -> raw bytes of `kind` (resampled to the format's rate)."""
    samples = np.clip(audio.resample(rate_of(kind)).samples, -1.0, 1.0)
    if kind == "audio/pcm":
        return (samples * 32767.0).round().astype("<i2").tobytes()
    return (_ulaw_encode(samples) if kind == "audio/pcmu" else _alaw_encode(samples)).tobytes()


def to_model_rate(samples: np.ndarray, kind: str) -> Audio:
    """Wire samples -> 16 kHz audio, what the model and the VAD read."""
    return Audio(samples.astype(np.float32), rate_of(kind)).resample(SAMPLE_RATE)


# ---- G.711 -------------------------------------------------------------------------------------------
# mu-law: 14-bit magnitude with bias 132, 8 segments; A-law: 13-bit, segment 0 linear. Codes are
# stored inverted (mu-law: all bits; A-law: even bits, 0x55), as the standard has them on the line.


def _ulaw_encode(samples: np.ndarray) -> np.ndarray:
    value = np.clip((samples * 32768.0).astype(np.int32), -32635, 32635)
    sign = (value < 0).astype(np.int32) << 7
    magnitude = np.abs(value) + 132
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)


def _ulaw_decode(codes: np.ndarray) -> np.ndarray:
    code = ~codes.astype(np.int32) & 0xFF
    exponent, mantissa = (code >> 4) & 0x07, code & 0x0F
    magnitude = (((mantissa << 3) + 132) << exponent) - 132
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.float32) / 32768.0


def _alaw_encode(samples: np.ndarray) -> np.ndarray:
    value = np.clip((samples * 32768.0).astype(np.int32) >> 3, -4096, 4095)  # 13-bit
    sign = np.where(value >= 0, 0x80, 0)
    magnitude = np.where(value >= 0, value, -value - 1)
    exponent = np.clip(np.floor(np.log2(np.maximum(magnitude, 1))).astype(np.int32) - 4, 0, 7)
    mantissa = np.where(exponent == 0, magnitude >> 1, magnitude >> exponent) & 0x0F
    return ((sign | (exponent << 4) | mantissa) ^ 0x55).astype(np.uint8)


def _alaw_decode(codes: np.ndarray) -> np.ndarray:
    code = codes.astype(np.int32) ^ 0x55
    exponent, mantissa = (code >> 4) & 0x07, code & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1))
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.float32) / 32768.0
