"""The default voice backend: English in Piper's natural voice, every other language (and any
eSpeak NG variant asked for by name) in eSpeak NG.

A voice name means the same speaker in every language it can: the OpenAI names are timbres of
the Piper voice in English and eSpeak NG variants of the same gender elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator

from voxtune.audio.audio import Audio
from voxtune.audio.voices.base import LanguageInfo, Style, UnknownVoiceError, VoiceInfo
from voxtune.audio.voices.espeak import OPENAI_VARIANTS, EspeakBackend
from voxtune.audio.voices.piper import PIPER_VOICE, TIMBRES, PiperBackend

__all__ = ["DefaultBackend"]


class DefaultBackend:
    """Routes each request to the Piper or the eSpeak NG backend (see the module docstring)."""

    def __init__(self, piper: PiperBackend | None = None, espeak: EspeakBackend | None = None) -> None:
        self.piper = piper or PiperBackend()
        self.espeak = espeak or EspeakBackend()

    def list_languages(self) -> list[LanguageInfo]:
        """Every language code either backend speaks (English is Piper's)."""
        return self.espeak.list_languages()

    def list_voices(self) -> list[VoiceInfo]:
        """The OpenAI names first (English timbre and other-language variant), then the Piper
        voice, then every eSpeak NG variant by its own name."""
        piper = {v.name: v for v in self.piper.list_voices()}
        openai = [
            VoiceInfo(name, f"{piper[name].backend_voice} (en), {variant} (other languages)", piper[name].gender)
            for name, variant in OPENAI_VARIANTS.items()
        ]
        return openai + [piper[PIPER_VOICE]] + self.espeak.list_voices()[len(OPENAI_VARIANTS) :]

    def resolve_voice(self, voice: str) -> None:
        """Raise `UnknownVoiceError` unless some language can be spoken by `voice`."""
        if voice.lower() not in TIMBRES:
            self.espeak.resolve_voice(voice)

    def backend_for(self, lang: str, voice: str) -> PiperBackend | EspeakBackend:
        """The backend that speaks `lang` with `voice`."""
        if self.piper.speaks(lang) and voice.lower() in TIMBRES:
            return self.piper
        if voice.lower() == PIPER_VOICE:
            self.espeak.resolve_language(lang)  # an unknown language is reported as such
            raise UnknownVoiceError(f"the {PIPER_VOICE} voice speaks English only, not {lang!r}")
        return self.espeak

    def render(
        self, text: str, lang: str, voice: str, style: str | Style = "neutral", speed: float = 1.0
    ) -> Iterator[Audio]:
        """One `Audio` per sentence, from the backend for `lang` and `voice`; arguments are
        checked at the call."""
        return self.backend_for(lang, voice).render(text, lang, voice, style, speed)
