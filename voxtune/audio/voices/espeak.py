"""The built-in voice: eSpeak NG, loaded from the `espeakng-loader` wheel through ctypes.

libespeak-ng is a process-wide singleton with global state, so one lock serialises every call,
and the library is opened on first use (never at import).
"""

from __future__ import annotations

import ctypes
import difflib
import threading
from collections.abc import Iterator
from functools import cached_property

import espeakng_loader
import numpy as np

from voxtune.audio.audio import Audio
from voxtune.audio.tempo import change_tempo
from voxtune.audio.voices.base import (
    OPENAI_VOICES,
    LanguageInfo,
    Style,
    UnknownLanguageError,
    UnknownVoiceError,
    VoiceError,
    VoiceInfo,
    check_speed,
    get_style,
    split_sentences,
)

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / flag values from speak_lib.h.
_OUTPUT_SYNCHRONOUS = 2
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_MIN_RATE, _MAX_RATE = 80, 450  # words per minute the engine accepts
_VARIANT_LANGUAGE = b"variant"

# Each OpenAI voice name is a distinct eSpeak NG voice variant (female ones for the names
# OpenAI gives female voices).
OPENAI_VARIANTS = {
    "alloy": "f5", "ash": "m2", "ballad": "m6", "coral": "f2", "echo": "m1",
    "fable": "m4", "marin": "Annie", "cedar": "m3", "nova": "f4", "onyx": "m7",
    "sage": "f3", "shimmer": "f1", "verse": "m5",
}  # fmt: skip
assert set(OPENAI_VARIANTS) == set(OPENAI_VOICES)


class _EspeakVoice(ctypes.Structure):
    # espeak_VOICE; `languages` is a run of (priority byte, NUL-terminated name), ended by 0.
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_LOCK = threading.Lock()


class EspeakBackend:
    """Voice backend over libespeak-ng: 100+ languages, ~100 voice variants, 22.05 kHz output."""

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None
        self._sample_rate = 0
        self._pieces: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # kept alive as long as the backend

    # ---- engine -----------------------------------------------------------------------------

    def _engine(self) -> ctypes.CDLL:
        if self._lib is None:
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            lib.espeak_Initialize.restype = ctypes.c_int
            lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))
            lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_EspeakVoice)]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_Synth.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
            ]  # fmt: skip
            rate = lib.espeak_Initialize(_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
            if rate <= 0:
                raise RuntimeError(f"libespeak-ng failed to initialise (code {rate})")
            lib.espeak_SetSynthCallback(self._callback)
            self._lib, self._sample_rate = lib, rate
        return self._lib

    def _collect(self, wav: ctypes.POINTER(ctypes.c_short), count: int, events: int) -> int:
        if count > 0:
            self._pieces.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # 0 = go on synthesising

    def _list(self, language: bytes | None) -> list[tuple[str, str, int, list[tuple[int, str]]]]:
        """(name, identifier, gender, [(priority, language)]) for each engine voice."""
        spec = None
        if language is not None:
            spec = _EspeakVoice()
            spec.languages = ctypes.cast(ctypes.c_char_p(language), ctypes.c_void_p)
        with _LOCK:
            voices = self._engine().espeak_ListVoices(ctypes.byref(spec) if spec else None)
            found, i = [], 0
            while voices[i]:
                v = voices[i].contents
                found.append((v.name.decode(), v.identifier.decode(), v.gender, _languages(v.languages)))
                i += 1
        return found

    # ---- catalogue --------------------------------------------------------------------------

    @cached_property
    def _variants(self) -> dict[str, tuple[str, int]]:
        """Lower-cased variant file name -> (file name, gender)."""
        return {
            ident.split("/", 1)[1].lower(): (ident.split("/", 1)[1], gender)
            for _, ident, gender, _ in self._list(_VARIANT_LANGUAGE)
        }

    @cached_property
    def _languages(self) -> dict[str, tuple[str, str]]:
        """Language code -> (voice identifier, voice name), best-priority voice per code."""
        best: dict[str, tuple[int, str, str]] = {}
        for name, ident, _, langs in self._list(None):
            for priority, code in langs:
                if code not in best or priority < best[code][0]:
                    best[code] = (priority, ident, name)
        return {code: (ident, name) for code, (_, ident, name) in best.items()}

    def list_languages(self) -> list[LanguageInfo]:
        """Every language code the engine speaks, with its voice's name."""
        return [LanguageInfo(code, name) for code, (_, name) in sorted(self._languages.items())]

    def list_voices(self) -> list[VoiceInfo]:
        """The OpenAI voice names first, then every engine variant by its own name."""
        gender = {1: "male", 2: "female"}
        voices = [
            VoiceInfo(name, variant, gender.get(self._variants[variant.lower()][1], "neutral"))
            for name, variant in OPENAI_VARIANTS.items()
        ]
        voices += [
            VoiceInfo(variant, variant, gender.get(g, "neutral"))
            for variant, g in sorted(self._variants.values(), key=lambda v: v[0].lower())
        ]
        return voices

    def resolve_voice(self, voice: str) -> tuple[str, int]:
        """An OpenAI name or a variant name -> (variant file name, gender code)."""
        key = OPENAI_VARIANTS.get(voice.lower(), voice).lower()
        if key not in self._variants:
            names = list(OPENAI_VARIANTS) + [v for v, _ in self._variants.values()]
            close = difflib.get_close_matches(voice, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `voxtune voices`"
            raise UnknownVoiceError(f"unknown voice {voice!r}{hint}")
        return self._variants[key]

    def resolve_language(self, lang: str) -> str:
        """A language code ("en", "pt-br", "zh") -> the engine voice identifier that speaks it."""
        code = lang.strip().lower().replace("_", "-")
        if code not in self._languages:
            close = difflib.get_close_matches(code, list(self._languages), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `voxtune voices --languages`"
            raise UnknownLanguageError(f"unknown language {lang!r}{hint}")
        return self._languages[code][0]

    # ---- rendering --------------------------------------------------------------------------

    def render(
        self, text: str, lang: str = "en", voice: str = "alloy", style: str = "neutral", speed: float = 1.0
    ) -> Iterator[Audio]:
        """Return an iterator of one `Audio` per sentence of `text`, spoken in `lang` by `voice`.

        Every argument is checked here, before any audio is rendered, so a bad request fails
        at the call and not halfway through a stream.
        """
        style_ = get_style(style)
        spec = self._voice_spec(lang, voice, style_)
        rate = round(style_.rate * check_speed(speed))
        sentences = split_sentences(text)
        if not sentences:
            raise VoiceError("nothing to speak: the text is empty")
        return (self._synthesize(sentence, spec, style_, rate) for sentence in sentences)

    def _voice_spec(self, lang: str, voice: str, style: Style) -> bytes:
        language = self.resolve_language(lang)
        variant, gender = self.resolve_voice(voice)
        if style.whisper:  # the engine's whisper variants replace the voice's own phonation
            variant = "whisperf" if gender == 2 else "whisper"
        return f"{language}+{variant}".encode()

    def _synthesize(self, sentence: str, spec: bytes, style: Style, rate: int) -> Audio:
        data = sentence.encode("utf-8") + b"\0"
        with _LOCK:
            lib = self._engine()
            if lib.espeak_SetVoiceByName(spec) != 0:
                raise VoiceError(f"the speech engine could not select voice {spec.decode()}")
            lib.espeak_SetParameter(_RATE, min(max(rate, _MIN_RATE), _MAX_RATE), 0)
            lib.espeak_SetParameter(_VOLUME, style.volume, 0)
            lib.espeak_SetParameter(_PITCH, style.pitch, 0)
            lib.espeak_SetParameter(_RANGE, style.pitch_range, 0)
            lib.espeak_SetParameter(_WORDGAP, style.pause // 10, 0)  # units of 10 ms
            self._pieces = []
            status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            pieces, self._pieces = self._pieces, []
        if status != 0:
            raise VoiceError(f"the speech engine failed on {sentence[:40]!r} (code {status})")
        samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
        audio = Audio(samples.astype(np.float32) / 32768.0, self._sample_rate)
        # The engine's rate stops at 80-450 words per minute; the rest is a time stretch.
        engine_rate = min(max(rate, _MIN_RATE), _MAX_RATE)
        return change_tempo(audio, rate / engine_rate) if engine_rate != rate else audio


def _languages(pointer: int) -> list[tuple[int, str]]:
    found = []
    while pointer and (priority := ctypes.c_ubyte.from_address(pointer).value):
        name = ctypes.string_at(pointer + 1)
        found.append((priority, name.decode()))
        pointer += 2 + len(name)
    return found
