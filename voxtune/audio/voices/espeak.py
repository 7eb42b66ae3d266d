"""The built-in voice: eSpeak NG, loaded from the `espeakng-loader` wheel through ctypes.

libespeak-ng is a process-wide singleton with global state (one voice, one set of parameters,
one output callback), so this module keeps exactly one engine per process, opened on first use
(never at import), and one lock serialises every call into it. `EspeakBackend` objects are
cheap views of that engine.
"""

from __future__ import annotations

import ctypes
import difflib
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import espeakng_loader
import numpy as np

from voxtune.audio.audio import Audio
from voxtune.audio.tempo import change_tempo
from voxtune.audio.voices.base import (
    DEFAULT_LANGUAGE,
    DEFAULT_VOICE,
    LanguageInfo,
    Style,
    UnknownLanguageError,
    UnknownVoiceError,
    VoiceError,
    VoiceInfo,
    check_speed,
    check_text,
    get_style,
    split_sentences,
)

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / flag values from speak_lib.h.
_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report a failed initialisation instead of calling exit()
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_MIN_RATE, _MAX_RATE = 80, 450  # words per minute the engine accepts
_VARIANT_LANGUAGE = b"variant"

# Each OpenAI voice name is a distinct eSpeak NG voice variant, of the gender its timbre of the
# English voice has (voices/piper.py), so that a name keeps its gender across languages.
OPENAI_VARIANTS = {
    "alloy": "m8",
    "ash": "m2",
    "ballad": "m6",
    "coral": "f2",
    "echo": "m1",
    "fable": "m4",
    "marin": "Annie",
    "cedar": "m3",
    "nova": "f4",
    "onyx": "m7",
    "sage": "f3",
    "shimmer": "f1",
    "verse": "m5",
}


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


class _Engine:
    """The one libespeak-ng of this process. Every method must be called with `_LOCK` held."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_EspeakVoice)]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self.data_path = Path(espeakng_loader.get_data_path())
        self.sample_rate = lib.espeak_Initialize(
            _OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"libespeak-ng failed to initialise (code {self.sample_rate})")
        self._pieces: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # lives as long as the engine: forever
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    def _collect(self, wav: ctypes._Pointer[ctypes.c_short], count: int, events: int) -> int:
        if count > 0:
            self._pieces.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # 0 = go on synthesising

    def list_voices(self, language: bytes | None) -> list[tuple[str, str, int, list[tuple[int, str]]]]:
        """(name, identifier, gender, [(priority, language)]) for each voice of `language`."""
        spec = None
        if language is not None:
            spec = _EspeakVoice()
            spec.languages = ctypes.cast(ctypes.c_char_p(language), ctypes.c_void_p)
        voices = self.lib.espeak_ListVoices(ctypes.byref(spec) if spec else None)
        found, i = [], 0
        while voices[i]:
            v = voices[i].contents
            found.append((v.name.decode(), v.identifier.decode(), v.gender, _languages(v.languages)))
            i += 1
        return found

    def synthesize(self, text: bytes, voice: bytes, style: Style, rate: int) -> np.ndarray:
        """int16 samples of `text` (UTF-8, NUL-terminated) spoken by `voice`."""
        if self.lib.espeak_SetVoiceByName(voice) != 0:
            raise VoiceError(f"the speech engine could not select voice {voice.decode()}")
        for parameter, value in (
            (_RATE, rate),
            (_VOLUME, style.volume),
            (_PITCH, style.pitch),
            (_RANGE, style.pitch_range),
            (_WORDGAP, style.pause // 10),  # units of 10 ms
        ):
            self.lib.espeak_SetParameter(parameter, value, 0)
        self._pieces = []
        try:
            status = self.lib.espeak_Synth(text, len(text), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            pieces = self._pieces
        finally:
            self._pieces = []
        if status != 0:
            raise VoiceError(f"the speech engine failed (code {status})")
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)


_LOCK = threading.Lock()
_ENGINE: _Engine | None = None


def _engine() -> _Engine:
    """The process's engine, opened on first use. Call with `_LOCK` held."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


class EspeakBackend:
    """Voice backend over libespeak-ng: 100+ languages, ~100 voice variants, 22.05 kHz output."""

    def _list(self, language: bytes | None) -> list[tuple[str, str, int, list[tuple[int, str]]]]:
        with _LOCK:
            return _engine().list_voices(language)

    # ---- catalogue --------------------------------------------------------------------------

    @cached_property
    def _variants(self) -> dict[str, tuple[str, int]]:
        """Lower-cased variant file name -> (file name, gender code)."""
        return {
            ident.split("/", 1)[1].lower(): (ident.split("/", 1)[1], gender)
            for _, ident, gender, _ in self._list(_VARIANT_LANGUAGE)
        }

    @cached_property
    def _languages(self) -> dict[str, tuple[str, str]]:
        """Lower-cased language code -> (voice identifier, voice name), best priority first.

        Voices whose pronunciation dictionary the wheel does not ship are left out: the engine
        would "speak" them as silence.
        """
        with _LOCK:
            data_path = _engine().data_path
        best: dict[str, tuple[int, str, str]] = {}
        for name, ident, _, langs in self._list(None):
            if not _has_dictionary(data_path, ident):
                continue
            for priority, code in langs:
                code = code.lower()
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
        """A language code ("en", "pt-BR", "zh") -> the engine voice identifier that speaks it."""
        code = lang.strip().lower().replace("_", "-")
        if code not in self._languages:
            close = difflib.get_close_matches(code, list(self._languages), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `voxtune voices --languages`"
            raise UnknownLanguageError(f"unknown language {lang!r}{hint}")
        return self._languages[code][0]

    def reseed(self, seed: int) -> None:
        """Seed the engine's noise generators (breath, whisper, Klatt voicing).

        Renders also depend on engine state left by earlier renders (pitch flutter), so a
        reproducible corpus seeds a fresh process and renders the same sequence in it. This
        also seeds the C library's `rand()`, which the engine uses too: call it only in a
        process that renders speech and nothing else that relies on `rand()`.
        """
        with _LOCK:
            _engine().lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
            ctypes.CDLL(None).srand(ctypes.c_uint(seed & 0xFFFFFFFF))

    # ---- rendering --------------------------------------------------------------------------

    def render(
        self,
        text: str,
        lang: str = DEFAULT_LANGUAGE,
        voice: str = DEFAULT_VOICE,
        style: str | Style = "neutral",
        speed: float = 1.0,
    ) -> Iterator[Audio]:
        """Return an iterator of one `Audio` per sentence of `text`, spoken in `lang` by `voice`
        with `style` (a name from `STYLES`, or a `Style` for finer control).

        Every argument is checked here, before any audio is rendered, so a bad request fails
        at the call and not halfway through a stream.
        """
        sentences = split_sentences(check_text(text))
        style_ = get_style(style)
        spec = self._voice_spec(lang, voice, style_)
        rate = round(style_.rate * check_speed(speed))
        return (self._synthesize(sentence, spec, style_, rate) for sentence in sentences)

    def _voice_spec(self, lang: str, voice: str, style: Style) -> bytes:
        language = self.resolve_language(lang)
        variant, gender = self.resolve_voice(voice)
        if style.whisper:  # the engine's whisper variants replace the voice's own phonation
            variant = "whisperf" if gender == 2 else "whisper"
        return f"{language}+{variant}".encode()

    def _synthesize(self, sentence: str, spec: bytes, style: Style, rate: int) -> Audio:
        # The engine's rate stops at 80-450 words per minute; the rest is a time stretch.
        engine_rate = min(max(rate, _MIN_RATE), _MAX_RATE)
        with _LOCK:
            engine = _engine()
            samples = engine.synthesize(sentence.encode("utf-8") + b"\0", spec, style, engine_rate)
        audio = Audio(samples.astype(np.float32) / 32768.0, engine.sample_rate)
        return change_tempo(audio, rate / engine_rate) if engine_rate != rate else audio


def _languages(pointer: int) -> list[tuple[int, str]]:
    found = []
    while pointer and (priority := ctypes.c_ubyte.from_address(pointer).value):
        name = ctypes.string_at(pointer + 1)
        found.append((priority, name.decode()))
        pointer += 2 + len(name)
    return found


def _has_dictionary(data_path: Path, identifier: str) -> bool:
    """Whether the pronunciation dictionary a voice file uses is present.

    As the engine does: the dictionary is named after the first `language` line's code up to
    its first hyphen, unless a `dictionary` line names another.
    """
    dictionary = None
    try:
        lines = (data_path / "lang" / identifier).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "language" and dictionary is None:
            dictionary = words[1].split("-")[0]
        elif len(words) >= 2 and words[0] == "dictionary":
            dictionary = words[1]
            break
    return dictionary is not None and (data_path / f"{dictionary}_dict").is_file()
