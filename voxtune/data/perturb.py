"""Voice perturbation: one synthesiser's voices made into many speakers and recording chains.

A model trained on a few synthetic voices learns their timbre along with the words. Each
perturbed clip gets its own speaker (a vocal-tract length, a pitch level, a speaking rate, moved
together by Praat's "Change gender", PSOLA) and its own chain (a random equaliser, a lossy
codec, a room, background noise), so what stays constant across the corpus is the words.

Shifts stay small beside what the style labels mean (styles move pitch by 2-4 semitones and rate
by 15-25%), so a perturbed clip keeps its style label. The parameters of a clip are drawn from
its own seed (the corpus seed and the clip id): perturbing one split never changes another's
clips, and a record carries what was done to it.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Literal, get_args

import numpy as np
from pydantic import Field

from voxtune.audio import Audio, encode, load
from voxtune.config import Config
from voxtune.data.augment import add_noise, colored_noise, reverb, room_impulse_response

__all__ = ["PerturbConfig", "draw", "perturb", "clip_rng"]

_PITCH_FLOOR, _PITCH_CEILING = 60.0, 600.0  # Praat's analysis range for speaking voices

Codec = Literal["mp3", "opus", "aac"]


class PerturbConfig(Config):
    """Which clips are perturbed, and the ranges each parameter is drawn from (uniformly)."""

    prob: float = Field(0.0, ge=0, le=1)  # share of the clips of `splits` perturbed; 0: off
    splits: list[str] = Field(default_factory=lambda: ["train", "valid"])
    formant: tuple[float, float] = (0.9, 1.15)  # vocal-tract length ratio (> 1: shorter tract)
    pitch_semitones: float = Field(1.5, ge=0)  # pitch level moved by up to this, either way
    tempo: tuple[float, float] = (0.92, 1.08)  # speaking rate
    eq_prob: float = Field(0.5, ge=0, le=1)
    eq_db: float = Field(8.0, ge=0)  # peak boost or cut of each of the equaliser's bands
    codec_prob: float = Field(0.3, ge=0, le=1)
    codecs: list[Codec] = Field(default_factory=lambda: list(get_args(Codec)), min_length=1)
    reverb_prob: float = Field(0.2, ge=0, le=1)
    rt60: tuple[float, float] = (0.2, 0.8)  # room reverberation time, seconds
    noise_prob: float = Field(0.3, ge=0, le=1)
    snr_db: tuple[float, float] = (10.0, 35.0)


def clip_rng(seed: int, clip_id: str) -> np.random.Generator:
    """The generator of one clip's perturbation: from the corpus seed and the clip id only."""
    digest = hashlib.sha256(f"{seed}/{clip_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def draw(config: PerturbConfig, split: str, rng: np.random.Generator) -> dict[str, Any] | None:
    """The perturbation of one clip (JSON-ready, for its record), or None to leave it as is."""
    if split not in config.splits or rng.random() >= config.prob:
        return None
    params: dict[str, Any] = {
        "formant": round(float(rng.uniform(*config.formant)), 4),
        "pitch": round(float(2 ** (rng.uniform(-1, 1) * config.pitch_semitones / 12)), 4),
        "tempo": round(float(rng.uniform(*config.tempo)), 4),
        "seed": int(rng.integers(2**31)),
    }
    if rng.random() < config.eq_prob:
        # Three bands at random centres (log-spaced 150 Hz - 6 kHz), each boosted or cut.
        params["eq"] = [
            [
                round(float(np.exp(rng.uniform(np.log(150), np.log(6000)))), 1),
                round(float(rng.uniform(-1, 1) * config.eq_db), 2),
                round(float(rng.uniform(0.3, 1.2)), 3),
            ]
            for _ in range(3)
        ]
    if rng.random() < config.codec_prob:
        params["codec"] = str(rng.choice(config.codecs))
    if rng.random() < config.reverb_prob:
        params["rt60"] = round(float(rng.uniform(*config.rt60)), 3)
    if rng.random() < config.noise_prob:
        params["noise"] = str(rng.choice(["white", "pink", "brown"]))
        params["snr_db"] = round(float(rng.uniform(*config.snr_db)), 2)
    return params


def perturb(audio: Audio, params: dict[str, Any]) -> Audio:
    """Apply a perturbation drawn by `draw`: speaker first, then equaliser, codec, room, noise."""
    rng = np.random.default_rng(params["seed"])
    out = _speaker(audio, params["formant"], params["pitch"], params["tempo"])
    if "eq" in params:
        out = equalise(out, params["eq"])
    if "codec" in params:
        out = load(encode(out, params["codec"]), out.sample_rate)
    if "rt60" in params:
        out = reverb(out, room_impulse_response(out.sample_rate, rng, params["rt60"]))
    if "noise" in params:
        out = add_noise(out, colored_noise(params["noise"], len(out), rng), params["snr_db"])
    return out


def _speaker(audio: Audio, formant: float, pitch: float, tempo: float) -> Audio:
    """Another speaker saying the same: vocal-tract length, pitch level and rate moved."""
    import parselmouth
    from parselmouth.praat import call

    sound = parselmouth.Sound(audio.samples.astype(np.float64), audio.sample_rate)
    median = call(call(sound, "To Pitch", 0.0, _PITCH_FLOOR, _PITCH_CEILING), "Get quantile", 0, 0, 0.5, "Hertz")
    new_median = median * pitch if np.isfinite(median) else 0.0  # 0: Praat keeps the pitch
    with warnings.catch_warnings():
        # A whispered clip has no voiced frame; Praat says so, and still shifts its formants.
        warnings.simplefilter("ignore", parselmouth.PraatWarning)
        changed = call(sound, "Change gender", _PITCH_FLOOR, _PITCH_CEILING, formant, new_median, 1.0, 1.0 / tempo)
    samples = np.asarray(changed.values[0], dtype=np.float32)
    peak, original = float(np.abs(samples).max(initial=0.0)), float(np.abs(audio.samples).max(initial=0.0))
    if peak > 0:  # the speaker changes, the recording level does not
        samples *= original / peak
    return Audio(samples, audio.sample_rate)


def equalise(audio: Audio, bands: list[list[float]]) -> Audio:
    """Peaking bands `[centre Hz, gain dB, width in octaves]` applied as one smooth gain curve
    over the spectrum (zero phase: no delay)."""
    spectrum = np.fft.rfft(audio.samples)
    freqs = np.fft.rfftfreq(len(audio.samples), 1.0 / audio.sample_rate)
    octaves = np.log2(np.maximum(freqs, 1.0))
    gain_db = np.zeros_like(freqs)
    for centre, db, width in bands:
        gain_db += db * np.exp(-0.5 * ((octaves - np.log2(centre)) / width) ** 2)
    samples = np.fft.irfft(spectrum * 10 ** (gain_db / 20), n=len(audio.samples)).astype(np.float32)
    peak = float(np.abs(samples).max(initial=0.0))
    return Audio(samples / peak if peak > 1.0 else samples, audio.sample_rate)
