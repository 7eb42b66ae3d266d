"""On-the-fly, seeded audio augmentation for training speech models.

Pure functions on `Audio` (additive noise at an exact SNR, coloured and babble noise, a G.711
telephone channel, simulated room reverb, speed and gain changes), and an `Augmenter` that
applies a random chain of them from an `AugmentConfig`. Every random draw comes from a
generator made from the example's seed, so a data loader gets the same augmentation for the
same (epoch, example), and the returned record says exactly what was applied (noise kind,
SNR, channel, RT60, speed, gain), so results can be broken down by them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr

from voxtune.audio.audio import Audio, resample
from voxtune.audio.decode import load
from voxtune.audio.errors import AudioError

NOISE_KINDS = ("white", "pink", "brown", "babble", "recorded")
CODECS = ("mulaw", "alaw")
# Power spectral density falls as 1/f**exponent.
_COLOR_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}

TELEPHONE_RATE = 8000
TELEPHONE_BAND = (300.0, 3400.0)  # Hz, the ITU-T voice band
_BANDPASS_TAPS = 257  # at 8 kHz: a ~160 Hz transition band, ~80 dB stopband with the Kaiser window
_KAISER_BETA = 8.0

_DECAY_60_DB = 3 * math.log(10)  # amplitude exp(-a t) is 60 dB down at t = 1 when a = 3 ln 10


class SilentAudioError(AudioError):
    """The signal (or the noise) is all zeros, so a signal-to-noise ratio has no meaning."""


# ---- noise -------------------------------------------------------------------------------------


def add_noise(audio: Audio, noise: np.ndarray | Audio, snr_db: float) -> Audio:
    """Mix `noise` into `audio` at exactly `snr_db`, measured as power over the whole clip.

    The noise is resampled to the audio's rate when it is an `Audio` (a bare array is taken to
    be at that rate already), then looped or cropped from its start to the audio's length, so
    the result is a deterministic function of its inputs; a random excerpt is the caller's
    choice (the `Augmenter` draws one). When the mix would leave [-1, 1], the whole mix is
    scaled down instead of clipped: clipping would add distortion and change the SNR.

    Args:
        audio: the clean signal.
        noise: the noise, of any length.
        snr_db: 10 * log10(signal power / noise power) of the result.

    Returns:
        The noisy audio, at the audio's rate and length.

    Raises:
        SilentAudioError: the signal or the noise is all zeros (no level to set the SNR by).
        ValueError: the noise is empty or `snr_db` is not finite.
    """
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be finite, got {snr_db}")
    if isinstance(noise, Audio):
        noise = noise.resample(audio.sample_rate).samples
    noise = np.asarray(noise)
    if noise.ndim != 1 or noise.size == 0:
        raise ValueError(f"noise must be a non-empty 1-D array, got shape {noise.shape}")
    signal = audio.samples.astype(np.float64)
    noise = np.resize(noise.astype(np.float64), len(signal))  # loops a short noise
    signal_power, noise_power = np.mean(signal**2), np.mean(noise**2)
    if signal_power == 0:
        raise SilentAudioError("cannot add noise at an SNR to silent audio")
    if noise_power == 0:
        raise SilentAudioError("the noise is silent, so no SNR can be reached")
    mix = signal + noise * math.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    peak = np.abs(mix).max()
    if peak > 1.0:
        mix /= peak
    return Audio(mix.astype(np.float32), audio.sample_rate)


def colored_noise(kind: str, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with a power-law spectrum, scaled to unit RMS.

    Args:
        kind: "white" (flat), "pink" (power ~ 1/f) or "brown" (power ~ 1/f**2); shaped in the
            frequency domain, with the DC bin removed (its power would be unbounded).
        samples: length; at least 2 for pink and brown.
        rng: the source of randomness.

    Returns:
        float32 `[samples]` with RMS 1.
    """
    if kind not in _COLOR_EXPONENTS:
        raise ValueError(f"unknown noise colour {kind!r} (choose from {', '.join(_COLOR_EXPONENTS)})")
    exponent = _COLOR_EXPONENTS[kind]
    if samples < (2 if exponent else 1):
        raise ValueError(f"{kind} noise needs at least {2 if exponent else 1} samples, got {samples}")
    noise = rng.standard_normal(samples)
    if exponent:
        spectrum = np.fft.rfft(noise)
        freqs = np.fft.rfftfreq(samples)
        spectrum[0] = 0.0
        spectrum[1:] /= freqs[1:] ** (exponent / 2)  # amplitude is the square root of power
        noise = np.fft.irfft(spectrum, samples)
    return (noise / np.sqrt(np.mean(noise**2))).astype(np.float32)


def babble(
    sources: Sequence[Audio],
    samples: int,
    sample_rate: int,
    rng: np.random.Generator,
    talkers: int | tuple[int, int] = (4, 6),
) -> np.ndarray:
    """Babble noise: several random excerpts of other speech, each at unit RMS, summed.

    Args:
        sources: speech clips to draw from (any rates; resampled to `sample_rate`). A clip may
            be drawn more than once, at another offset, when there are fewer clips than talkers.
        samples: length of the result.
        sample_rate: rate of the result.
        rng: the source of randomness (which clips, where they start, how many talkers).
        talkers: how many voices, or an inclusive (low, high) range to draw the count from.

    Returns:
        float32 `[samples]` with RMS 1.

    Raises:
        ValueError: no sources, a bad talker count, or only silent sources were drawn.
    """
    if not sources:
        raise ValueError("babble needs at least one speech clip to draw from")
    low, high = (talkers, talkers) if isinstance(talkers, int) else talkers
    if not 1 <= low <= high:
        raise ValueError(f"talkers must be at least 1 (low <= high), got {talkers}")
    total = np.zeros(samples)
    for _ in range(int(rng.integers(low, high + 1))):
        clip = sources[int(rng.integers(len(sources)))].resample(sample_rate).samples
        excerpt = _excerpt(clip, samples, rng).astype(np.float64)
        rms = np.sqrt(np.mean(excerpt**2))
        if rms > 0:  # a pause-only excerpt adds no voice; normalising it would divide by zero
            total += excerpt / rms
    rms = np.sqrt(np.mean(total**2))
    if rms == 0:
        raise ValueError("the babble sources drawn are silent")
    return (total / rms).astype(np.float32)


def _excerpt(samples: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` samples from a random start, wrapping around (looping) past the end."""
    if len(samples) == 0:
        raise ValueError("cannot take an excerpt of empty audio")
    start = int(rng.integers(len(samples)))
    return samples[(start + np.arange(length)) % len(samples)]


def no_speech(seconds: float, sample_rate: int, rng: np.random.Generator) -> Audio:
    """A clip in which nobody speaks: digital silence, or white, pink or brown noise, or mains
    hum, at -60 to -12 dBFS (what a microphone hears between words, or when nobody is there)."""
    samples = max(int(seconds * sample_rate), 1)
    kind = ("silence", "white", "pink", "brown", "hum")[int(rng.integers(5))]
    if kind == "silence":
        return Audio(np.zeros(samples, np.float32), sample_rate)
    if kind == "hum":
        t = np.arange(samples) / sample_rate
        mains = float(rng.choice([50.0, 60.0]))
        wave = sum(np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 6))
        wave = wave / np.sqrt(np.mean(wave**2)) + 0.1 * colored_noise("white", samples, rng)
    else:
        wave = colored_noise(kind, samples, rng)
    level = 10 ** (rng.uniform(-60, -12) / 20)
    return Audio((level * wave / np.sqrt(np.mean(wave**2))).astype(np.float32), sample_rate)


# ---- telephone channel -------------------------------------------------------------------------


def telephone(
    audio: Audio,
    rng: np.random.Generator | None = None,
    *,
    codec: str = "mulaw",
) -> Audio:
    """A narrowband telephone channel: 8 kHz, 300-3400 Hz, G.711 companding, and back.

    The audio is resampled to 8 kHz (soxr's anti-alias filter removes everything above 4 kHz),
    band-limited with a zero-phase windowed-sinc FIR (filtering at 8 kHz rather than the input
    rate needs the fewest taps for the same transition width), passed through a G.711 encode and
    decode, and resampled back to the input rate and length.

    Args:
        audio: the input, at any rate.
        rng: when given, the band edges are drawn around the nominal ones (low 200-400 Hz,
            high 3100-3600 Hz), as handsets differ; None keeps 300-3400 Hz.
        codec: "mulaw" (G.711 mu-law, North America and Japan) or "alaw" (Europe).

    Returns:
        The audio at its own rate and length.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown telephone codec {codec!r} (choose from {', '.join(CODECS)})")
    low, high = TELEPHONE_BAND if rng is None else (rng.uniform(200.0, 400.0), rng.uniform(3100.0, 3600.0))
    narrow = resample(audio.samples, audio.sample_rate, TELEPHONE_RATE)
    narrow = np.convolve(narrow, bandpass_filter(TELEPHONE_RATE, low, high), mode="same")
    narrow = g711_decode(g711_encode(narrow, codec), codec)
    wide = resample(narrow, TELEPHONE_RATE, audio.sample_rate)
    return Audio(_fit_length(wide, len(audio)), audio.sample_rate)


def bandpass_filter(sample_rate: int, low_hz: float, high_hz: float, taps: int = _BANDPASS_TAPS) -> np.ndarray:
    """Linear-phase FIR band-pass taps (Kaiser-windowed sinc); odd `taps`, so that
    `np.convolve(x, h, mode="same")` adds no delay."""
    if taps % 2 == 0:
        raise ValueError(f"taps must be odd (a whole-sample delay to remove), got {taps}")
    if not 0 < low_hz < high_hz < sample_rate / 2:
        raise ValueError(f"need 0 < low_hz < high_hz < {sample_rate / 2}, got {low_hz}, {high_hz}")
    n = np.arange(taps) - taps // 2

    def lowpass(cutoff: float) -> np.ndarray:
        return 2 * cutoff / sample_rate * np.sinc(2 * cutoff / sample_rate * n)

    return ((lowpass(high_hz) - lowpass(low_hz)) * np.kaiser(taps, _KAISER_BETA)).astype(np.float32)


def g711_encode(samples: np.ndarray, codec: str = "mulaw") -> np.ndarray:
    """Float samples in [-1, 1] to G.711 8-bit codes (the ITU-T / Sun reference algorithm,
    on 16-bit linear input); samples beyond full scale saturate, as in a real codec."""
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768), -32768, 32767).astype(np.int32)
    if codec == "mulaw":
        return _mulaw_encode(pcm)
    if codec == "alaw":
        return _alaw_encode(pcm)
    raise ValueError(f"unknown G.711 codec {codec!r} (choose from {', '.join(CODECS)})")


def g711_decode(codes: np.ndarray, codec: str = "mulaw") -> np.ndarray:
    """G.711 8-bit codes back to float32 samples in [-1, 1]."""
    codes = np.asarray(codes, dtype=np.int32)
    if codec == "mulaw":
        pcm = _mulaw_decode(codes)
    elif codec == "alaw":
        pcm = _alaw_decode(codes)
    else:
        raise ValueError(f"unknown G.711 codec {codec!r} (choose from {', '.join(CODECS)})")
    return (pcm / 32768).astype(np.float32)


_MULAW_BIAS = 0x84


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bits needed for each non-negative integer (0 for 0)."""
    return np.frexp(values.astype(np.float64))[1]


def _mulaw_encode(pcm: np.ndarray) -> np.ndarray:
    sign = np.where(pcm < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(pcm) + _MULAW_BIAS, 0x7FFF)  # 0x7FFF: the top of segment 7
    segment = _bit_length(magnitude) - 8  # the bias puts every magnitude at 2**7 or above
    mantissa = (magnitude >> (segment + 3)) & 0x0F
    return (~(sign | (segment << 4) | mantissa) & 0xFF).astype(np.uint8)


def _mulaw_decode(codes: np.ndarray) -> np.ndarray:
    codes = ~codes & 0xFF
    segment, mantissa = (codes >> 4) & 0x07, codes & 0x0F
    magnitude = (((mantissa << 3) + _MULAW_BIAS) << segment) - _MULAW_BIAS
    return np.where(codes & 0x80, -magnitude, magnitude)


def _alaw_encode(pcm: np.ndarray) -> np.ndarray:
    value = pcm >> 3  # A-law works on 13 bits
    negative = value < 0
    value = np.where(negative, -value - 1, value)
    segment = np.maximum(_bit_length(value) - 5, 0)
    mantissa = np.where(segment < 2, value >> 1, value >> np.maximum(segment, 1)) & 0x0F
    mask = np.where(negative, 0x55, 0xD5)  # even bits inverted, and the sign bit set for positives
    return (((segment << 4) | mantissa) ^ mask).astype(np.uint8)


def _alaw_decode(codes: np.ndarray) -> np.ndarray:
    codes = codes ^ 0x55
    segment, mantissa = (codes >> 4) & 0x07, codes & 0x0F
    magnitude = np.where(
        segment == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(segment - 1, 0),
    )
    return np.where(codes & 0x80, magnitude, -magnitude)


def _fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Crop or zero-pad to `length`: resampling there and back can be a sample off."""
    if len(samples) >= length:
        return samples[:length]
    return np.concatenate([samples, np.zeros(length - len(samples), samples.dtype)])


# ---- reverb ------------------------------------------------------------------------------------


def room_impulse_response(
    sample_rate: int,
    rng: np.random.Generator,
    rt60: float,
    *,
    drr_db: float = 0.0,
    early_reflections: int = 8,
    air_cutoff_hz: float = 4000.0,
) -> np.ndarray:
    """A simulated room impulse response: a direct path, early reflections, a noise tail.

    The tail is Gaussian noise low-passed (first-order, at `air_cutoff_hz`: walls and air absorb
    high frequencies) under an exponential envelope whose energy falls 60 dB in `rt60`
    seconds. Early reflections are sparse impulses of random sign in the first 50 ms under the
    same envelope. The response is 1.25 * rt60 long (the tail ends 75 dB down).

    Args:
        sample_rate: rate of the response.
        rng: the source of randomness (the tail noise, reflection times and signs).
        rt60: reverberation time in seconds.
        drr_db: direct-to-reverberant energy ratio (direct impulse vs everything after it).
        early_reflections: how many discrete early reflections; 0 for none.
        air_cutoff_hz: corner frequency of the tail's low-pass.

    Returns:
        float32 `[1.25 * rt60 * sample_rate]`, the direct path at index 0 with value 1.
    """
    if not (math.isfinite(rt60) and rt60 > 0):
        raise ValueError(f"rt60 must be a positive number of seconds, got {rt60}")
    length = max(2, int(round(1.25 * rt60 * sample_rate)))
    t = np.arange(length) / sample_rate
    envelope = np.exp(-_DECAY_60_DB * t / rt60)

    spectrum = np.fft.rfft(rng.standard_normal(length))
    spectrum /= np.sqrt(1 + (np.fft.rfftfreq(length, 1 / sample_rate) / air_cutoff_hz) ** 2)
    reverberant = np.fft.irfft(spectrum, length) * envelope

    # Reflections start a little after the direct sound: a source is never at the wall.
    first, last = int(0.002 * sample_rate), min(length - 1, int(0.05 * sample_rate))
    if early_reflections and last > first:
        where = rng.integers(first, last + 1, size=early_reflections)
        signs = rng.choice([-1.0, 1.0], size=early_reflections)
        strength = 3 * np.sqrt(np.mean(reverberant[first : last + 1] ** 2))  # stands out of the tail
        np.add.at(reverberant, where, signs * strength * envelope[where])

    reverberant[0] = 0.0
    energy = np.sum(reverberant**2)
    rir = reverberant * math.sqrt(10 ** (-drr_db / 10) / energy) if energy > 0 else reverberant
    rir[0] = 1.0
    return rir.astype(np.float32)


def reverb(audio: Audio, rir: np.ndarray) -> Audio:
    """Convolve `audio` with a room impulse response (at the audio's rate).

    The direct path (the strongest tap) is aligned with the input, so no delay is added; the
    result keeps the input's length (the tail past the end is cut) and its peak level.
    """
    rir = np.asarray(rir, dtype=np.float64)
    if rir.ndim != 1 or rir.size == 0:
        raise ValueError(f"rir must be a non-empty 1-D array, got shape {rir.shape}")
    if len(audio) == 0:
        return audio
    x = audio.samples.astype(np.float64)
    direct = int(np.argmax(np.abs(rir)))
    size = len(x) + len(rir) - 1
    n_fft = 1 << (size - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(x, n_fft) * np.fft.rfft(rir, n_fft), n_fft)[direct : direct + len(x)]
    peak_in, peak_out = np.abs(x).max(), np.abs(wet).max()
    if peak_out > 0:
        wet *= peak_in / peak_out
    return Audio(wet.astype(np.float32), audio.sample_rate)


# ---- speed and gain ----------------------------------------------------------------------------


def change_speed(audio: Audio, factor: float) -> Audio:
    """Play `audio` `factor` times faster, pitch moving with it (sox's "speed", tape-style).

    The samples are read as if recorded at `factor * sample_rate` and resampled to
    `sample_rate` (soxr, high quality): duration scales by 1 / factor, every frequency by factor.
    """
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"speed factor must be a positive finite number, got {factor}")
    if factor == 1.0 or len(audio) == 0:
        return audio
    # soxr takes non-integer rates, so the factor is exact rather than rounded to whole Hz.
    out = soxr.resample(audio.samples, audio.sample_rate * factor, audio.sample_rate, quality="HQ")
    return Audio(np.clip(out, -1.0, 1.0), audio.sample_rate)


def change_gain(audio: Audio, db: float) -> Audio:
    """Scale `audio` by `db` decibels, never past full scale.

    A gain that would push the peak over 1.0 is reduced to the one that brings the peak to
    exactly 1.0 (`applied_gain_db` says how much that is), so the result is never clipped:
    hard clipping would add distortion that the gain alone does not.
    """
    applied = applied_gain_db(audio, db)
    if applied == 0.0:
        return audio
    scaled = audio.samples.astype(np.float64) * 10 ** (applied / 20)
    return Audio(np.clip(scaled, -1.0, 1.0).astype(np.float32), audio.sample_rate)


def applied_gain_db(audio: Audio, db: float) -> float:
    """The gain `change_gain(audio, db)` applies: `db`, or less where that would clip."""
    if not math.isfinite(db):
        raise ValueError(f"gain must be a finite number of dB, got {db}")
    peak = float(np.abs(audio.samples).max()) if len(audio) else 0.0
    if peak == 0.0:
        return float(db)  # silence stays silence at any gain
    return float(min(db, -20 * math.log10(peak)))


# ---- the random chain --------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """What the `Augmenter` may apply, each step with its own probability.

    Ranges are (low, high), drawn uniformly. Steps run in the order a recording meets them:
    speed (the talker), reverb (the room), noise (the room), telephone (the channel),
    gain (the receiver's level).

    Attributes:
        noise_prob: chance of additive noise.
        snr_db: range of the signal-to-noise ratio, in dB.
        noise_kinds: kinds to choose from, uniformly: "white", "pink", "brown", "babble"
            (needs babble sources) and "recorded" (needs `noise_files`). A kind whose material
            the augmenter was not given is left out (see `Augmenter.noise_kinds`).
        noise_files: paths of recorded noise, loaded with `voxtune.audio.load` on first use.
        telephone_prob: chance of the telephone channel.
        telephone_codecs: G.711 laws to choose from, uniformly ("mulaw", "alaw").
        reverb_prob: chance of room reverb.
        rt60: range of the reverberation time, in seconds.
        speed_prob: chance of a speed change (pitch moves with it).
        speeds: range of the speed factor.
        gain_prob: chance of a gain change.
        gain_db: range of the gain, in dB (reduced where it would clip; the record has the gain applied).
    """

    noise_prob: float = 0.5
    snr_db: tuple[float, float] = (0.0, 20.0)
    noise_kinds: tuple[str, ...] = NOISE_KINDS
    noise_files: Sequence[str | os.PathLike] = ()
    telephone_prob: float = 0.1
    telephone_codecs: tuple[str, ...] = CODECS
    reverb_prob: float = 0.3
    rt60: tuple[float, float] = (0.2, 0.8)
    speed_prob: float = 0.3
    speeds: tuple[float, float] = (0.9, 1.1)
    gain_prob: float = 0.3
    gain_db: tuple[float, float] = (-6.0, 6.0)

    def __post_init__(self) -> None:
        # Tuples, whatever sequence was given (a YAML list, say): the config stays immutable.
        for name in ("snr_db", "noise_kinds", "noise_files", "telephone_codecs", "rt60", "speeds", "gain_db"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("noise_prob", "telephone_prob", "reverb_prob", "speed_prob", "gain_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("snr_db", "rt60", "speeds", "gain_db"):
            low, high = getattr(self, name)
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"{name} must be a finite (low, high) range, got {getattr(self, name)}")
        if self.rt60[0] <= 0 or self.speeds[0] <= 0:
            raise ValueError(f"rt60 and speeds must be positive, got {self.rt60} and {self.speeds}")
        if unknown := set(self.noise_kinds) - set(NOISE_KINDS):
            raise ValueError(f"unknown noise kinds {sorted(unknown)} (choose from {', '.join(NOISE_KINDS)})")
        if not self.telephone_codecs or set(self.telephone_codecs) - set(CODECS):
            raise ValueError(f"telephone_codecs must be some of {CODECS}, got {self.telephone_codecs}")


class Augmenter:
    """Applies a seeded random chain of augmentations from an `AugmentConfig`.

    Each step draws from its own generator, spawned from the example's seed, so one step's
    draws do not shift when another step's probability changes.

    Args:
        config: what may be applied, and how likely.
        babble_sources: speech clips to make babble from (needed for the "babble" kind).
    """

    _STEPS = ("speed", "reverb", "noise", "telephone", "gain")

    def __init__(self, config: AugmentConfig, babble_sources: Sequence[Audio] = ()) -> None:
        self.config = config
        self.babble_sources = tuple(babble_sources)
        have = {"babble": bool(self.babble_sources), "recorded": bool(config.noise_files)}
        self.noise_kinds = tuple(kind for kind in config.noise_kinds if have.get(kind, True))
        if config.noise_prob > 0 and not self.noise_kinds:
            raise ValueError(
                f"noise_prob is {config.noise_prob} but no noise kind can be made from {config.noise_kinds} "
                "(babble needs babble_sources, recorded needs noise_files)"
            )
        self._noise_cache: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, audio: Audio, seed: int | Sequence[int]) -> tuple[Audio, dict[str, Any]]:
        """Augment one example.

        Args:
            audio: the clean example.
            seed: a non-negative int, or a sequence of them such as (epoch, example index);
                the same seed gives the same output and record.

        Returns:
            (augmented audio, record). The record has "channel" ("clean" or "telephone-mulaw",
            "telephone-alaw") always, and "speed", "rt60", "noise" and "snr_db" (plus
            "noise_file" for recorded noise), "gain_db" when those steps were applied.
            A speed change changes the length; the other steps keep it.
        """
        rngs = dict(zip(self._STEPS, map(np.random.default_rng, np.random.SeedSequence(seed).spawn(5)), strict=True))
        record: dict[str, Any] = {}
        audio = self._speed(audio, rngs["speed"], record)
        audio = self._reverb(audio, rngs["reverb"], record)
        audio = self._noise(audio, rngs["noise"], record)
        audio = self._telephone(audio, rngs["telephone"], record)
        audio = self._gain(audio, rngs["gain"], record)
        return audio, record

    def _speed(self, audio: Audio, rng: np.random.Generator, record: dict) -> Audio:
        if rng.random() >= self.config.speed_prob:
            return audio
        record["speed"] = float(rng.uniform(*self.config.speeds))
        return change_speed(audio, record["speed"])

    def _reverb(self, audio: Audio, rng: np.random.Generator, record: dict) -> Audio:
        if rng.random() >= self.config.reverb_prob:
            return audio
        record["rt60"] = float(rng.uniform(*self.config.rt60))
        return reverb(audio, room_impulse_response(audio.sample_rate, rng, record["rt60"]))

    def _noise(self, audio: Audio, rng: np.random.Generator, record: dict) -> Audio:
        if rng.random() >= self.config.noise_prob:
            return audio
        kind = self.noise_kinds[int(rng.integers(len(self.noise_kinds)))]
        snr_db = float(rng.uniform(*self.config.snr_db))
        if not np.any(audio.samples):
            return audio  # silence has no level to set an SNR by; the record says no noise
        if kind == "babble":
            noise = babble(self.babble_sources, len(audio), audio.sample_rate, rng)
        elif kind == "recorded":
            path = self.config.noise_files[int(rng.integers(len(self.config.noise_files)))]
            noise = _excerpt(self._recorded(path, audio.sample_rate), len(audio), rng)
            record["noise_file"] = os.fspath(path)
        else:
            noise = colored_noise(kind, len(audio), rng)
        record.update(noise=kind, snr_db=snr_db)
        return add_noise(audio, noise, snr_db)

    def _recorded(self, path: str | os.PathLike, sample_rate: int) -> np.ndarray:
        key = (os.fspath(path), sample_rate)
        if key not in self._noise_cache:
            self._noise_cache[key] = load(path, sample_rate, max_duration=None).samples
        return self._noise_cache[key]

    def _telephone(self, audio: Audio, rng: np.random.Generator, record: dict) -> Audio:
        if rng.random() >= self.config.telephone_prob:
            record["channel"] = "clean"
            return audio
        codec = self.config.telephone_codecs[int(rng.integers(len(self.config.telephone_codecs)))]
        record["channel"] = f"telephone-{codec}"
        return telephone(audio, codec=codec)

    def _gain(self, audio: Audio, rng: np.random.Generator, record: dict) -> Audio:
        if rng.random() >= self.config.gain_prob:
            return audio
        record["gain_db"] = applied_gain_db(audio, float(rng.uniform(*self.config.gain_db)))
        return change_gain(audio, record["gain_db"])
