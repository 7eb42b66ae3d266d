"""The voices: catalogue, streaming by sentence, styles a listener would notice, errors.

Behaviour a listener hears is checked on both engines: eSpeak NG and Piper's natural English
voice (with its sampling noise off, so that renders repeat exactly)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from voxtune.audio import Audio, log_mel, voices
from voxtune.audio.prosody import pitch
from voxtune.audio.voices import (
    MAX_TEXT_CHARS,
    OPENAI_VOICES,
    EspeakBackend,
    PiperBackend,
    Style,
    UnknownLanguageError,
    UnknownStyleError,
    UnknownVoiceError,
    VoiceError,
    split_sentences,
)

TEXT = "The weather is lovely today. Shall we walk to the river? I think we should!"
ENGINES = {"espeak": EspeakBackend(), "piper": PiperBackend(variation=False)}


@pytest.fixture(params=list(ENGINES))
def engine(request):
    return ENGINES[request.param]


def _say(backend, text: str = TEXT, voice: str = "alloy", style: str = "neutral", speed: float = 1.0) -> Audio:
    return voices.synthesize(text, "en", voice, style, speed, backend=backend)


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples**2)))


def _mean_f0(audio) -> float:
    return float(np.nanmean(pitch(audio)))


@pytest.mark.parametrize("backend", [voices.default_backend(), *ENGINES.values()], ids=["default", *ENGINES])
def test_openai_voices_come_first_and_map_to_distinct_engine_voices(backend):
    listed = voices.list_voices(backend)
    assert {v.name for v in listed[: len(OPENAI_VOICES)]} == set(OPENAI_VOICES)
    openai = {v.name: v.backend_voice for v in listed if v.name in OPENAI_VOICES}
    assert set(openai) == set(OPENAI_VOICES)
    assert len(set(openai.values())) == len(OPENAI_VOICES)
    if not isinstance(backend, PiperBackend):
        assert len(listed) >= len(OPENAI_VOICES) + 50  # every engine variant is offered too


def _timbre(audio) -> np.ndarray:
    """Long-term average spectrum: each log-mel band's mean over the utterance."""
    return log_mel(audio).numpy().mean(axis=1)


# How far apart two voices' long-term spectra must be, and how close one voice's to itself
# after other speech: eSpeak NG's variants differ more than the Piper timbres (one speaker, moved).
APART = {"espeak": (0.025, 0.01), "piper": (0.008, 0.001)}


@pytest.mark.parametrize("name", list(ENGINES))
def test_each_openai_voice_sounds_different(name):
    backend, (apart, again_within) = ENGINES[name], APART[name]
    text = "Good morning, everyone. The weather is lovely today."
    rendered = {voice: _say(backend, text, voice) for voice in OPENAI_VOICES}
    timbre = {voice: _timbre(audio) for voice, audio in rendered.items()}
    # The same voice again, after other speech, is far closer to itself than to any other voice.
    _say(backend, "Something else first.", "onyx", "happy")
    again = np.abs(_timbre(_say(backend, text, "alloy")) - timbre["alloy"]).mean()
    assert again < again_within
    names = list(rendered)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(timbre[a] - timbre[b]).mean() > apart, (a, b)
    # Voices listed as female speak higher on average than those listed as male.
    gender = {v.name: v.gender for v in voices.list_voices(backend)}
    f0 = {name: _mean_f0(audio) for name, audio in rendered.items()}
    female = np.mean([f0[n] for n in names if gender[n] == "female"])
    male = np.mean([f0[n] for n in names if gender[n] == "male"])
    assert female > 1.3 * male


def test_openai_names_are_exactly_the_mapped_ones_with_one_gender_across_engines():
    from voxtune.audio.voices.espeak import OPENAI_VARIANTS
    from voxtune.audio.voices.piper import TIMBRES

    assert set(OPENAI_VARIANTS) == set(OPENAI_VOICES) == set(TIMBRES) - {"joe"}
    espeak = {v.name: v.gender for v in ENGINES["espeak"].list_voices()}
    assert all(espeak[name] == TIMBRES[name].gender for name in OPENAI_VOICES)


def test_over_a_hundred_languages_and_each_one_speaks():
    languages = voices.list_languages()
    codes = {lang.code for lang in languages}
    assert len(codes) >= 100
    assert {"en", "de", "fr", "es", "it", "pt", "ru", "zh", "ja", "hi", "ar", "sw"} <= codes
    assert "fo" not in codes  # listed by the engine, but its dictionary is not in the wheel
    for lang in languages:  # digits and letters: something every dictionary can say
        audio = voices.synthesize("1 2 3. a b c. ok", lang.code)
        assert audio.duration > 0.5 and np.abs(audio.samples).max() > 0.05, lang.code
    assert voices.synthesize("Hallo", "DE").duration > 0.2  # codes are case-insensitive


@pytest.mark.parametrize(
    "lang, text",
    [
        ("en", "Hello world."),
        ("de", "Guten Tag."),
        ("fr", "Bonjour à tous."),
        ("es", "Buenos días."),
        ("ru", "Доброе утро."),
        ("zh", "早上好。"),
        ("ja", "おはようございます。"),
        ("hi", "सुप्रभात।"),
        ("ar", "صباح الخير."),
        ("pt-br", "Bom dia."),
    ],
)
def test_languages_render_audible_speech(lang, text):
    audio = voices.synthesize(text, lang)
    assert audio.sample_rate == 22050
    assert 0.3 < audio.duration < 5
    assert _rms(audio.samples) > 0.01


def test_render_streams_one_chunk_per_sentence(engine):
    chunks = list(engine.render(TEXT, "en", "alloy", "neutral", 1.0))
    assert len(chunks) == 3
    assert all(c.duration > 0.5 and _rms(c.samples) > 0.01 for c in chunks)
    assert split_sentences("One. Two?\nThree! 四。五") == ["One.", "Two?", "Three!", "四。", "五"]


def test_happy_is_higher_livelier_and_faster_than_sad(engine):
    happy = _say(engine, style="happy")
    sad = _say(engine, style="sad")
    happy_f0, sad_f0 = pitch(happy), pitch(sad)
    assert np.nanmean(happy_f0) > 1.25 * np.nanmean(sad_f0)
    assert np.nanstd(happy_f0) > 2 * np.nanstd(sad_f0)  # wider pitch range
    assert sad.duration > 1.25 * happy.duration  # slower
    assert _rms(happy.samples) > _rms(sad.samples)


def test_angry_is_louder_than_calm_and_excited_faster(engine):
    angry, calm, excited = (_say(engine, style=s) for s in ("angry", "calm", "excited"))
    assert _rms(angry.samples) > 1.5 * _rms(calm.samples)
    assert calm.duration > 1.25 * excited.duration


def test_whisper_has_almost_no_voiced_frames(engine):
    neutral, whisper = _say(engine), _say(engine, style="whisper")
    voiced = lambda audio: np.mean(~np.isnan(pitch(audio)))  # noqa: E731
    assert voiced(neutral) > 0.2
    assert voiced(whisper) < 0.25 * voiced(neutral)


@pytest.mark.parametrize("slow, fast", [(0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0)])
def test_speed_changes_duration_across_the_whole_range(engine, slow, fast):
    slower = _say(engine, speed=slow).duration
    faster = _say(engine, speed=fast).duration
    assert 1.5 < slower / faster < 2.6


def test_concurrent_rendering_matches_sequential(engine):
    # eSpeak NG carries state (pitch flutter, pauses) from call to call, so a render differs
    # slightly with what came before it (up to ~2% in length). Without the locks, concurrent
    # calls crash the engines or mix samples between threads.
    voices_ = ("alloy", "onyx", "nova", "echo")
    expected = {v: _say(engine, voice=v) for v in voices_}
    results: dict = {}

    def work(voice: str) -> None:
        results[voice] = _say(engine, voice=voice)

    threads = [threading.Thread(target=work, args=(v,)) for v in voices_]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for voice, audio in expected.items():
        assert results[voice].duration == pytest.approx(audio.duration, rel=0.03)
        assert _mean_f0(results[voice]) == pytest.approx(_mean_f0(audio), rel=0.03)


def test_every_espeak_backend_object_shares_the_one_engine():
    before = _say(ENGINES["espeak"], "Good morning.", "onyx")
    other = EspeakBackend()
    mine = np.concatenate([c.samples for c in other.render("Good morning.", "en", "onyx", "neutral", 1.0)])
    del other
    gc.collect()  # a dropped backend object must not take the engine or its callback with it
    after = _say(ENGINES["espeak"], "Good morning.", "onyx")
    for audio in (mine, after.samples):
        assert len(audio) == pytest.approx(len(before), rel=0.02)


def test_pauses_between_words_lengthen_speech():
    backend = ENGINES["espeak"]
    spec = backend._voice_spec("en", "alloy", Style())
    plain = backend._synthesize("one two three four five six", spec, Style(), 175)
    paused = backend._synthesize("one two three four five six", spec, Style(pause=200), 175)
    assert paused.duration > plain.duration + 0.8  # five gaps of 200 ms


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"voice": "alloyy"}, UnknownVoiceError, "alloy"),
        ({"lang": "klingon"}, UnknownLanguageError, "klingon"),
        ({"style": "sarcastic"}, UnknownStyleError, "happy"),
        ({"speed": 9.0}, VoiceError, "speed"),
        ({"text": "   "}, VoiceError, "empty"),
        ({"text": "hi \udcff there"}, VoiceError, "not valid Unicode"),
        ({"text": "word " * (MAX_TEXT_CHARS // 5 + 1)}, VoiceError, "limit"),
        ({"speed": float("nan")}, VoiceError, "speed"),
    ],
)
def test_bad_requests_fail_at_the_call_with_a_helpful_message(kwargs, error, words):
    args = {"text": TEXT} | kwargs
    text = args.pop("text")
    with pytest.raises(error, match=words):
        voices.render(text, **args)  # raises before any iteration


def test_default_speaks_english_in_the_natural_voice_and_the_rest_in_espeak():
    default = voices.default_backend()
    assert isinstance(default.backend_for("en", "alloy"), PiperBackend)
    assert isinstance(default.backend_for("EN-US", "Joe"), PiperBackend)
    for lang, voice in (("de", "alloy"), ("en-gb", "alloy"), ("en", "m3"), ("fr", "nova")):
        assert isinstance(default.backend_for(lang, voice), EspeakBackend), (lang, voice)
    # What the default says in English is the Piper voice, not eSpeak NG's (by the spectrum).
    text = "Good morning, everyone. The weather is lovely today."
    heard = _timbre(voices.synthesize(text))
    piper, espeak = (_timbre(_say(ENGINES[name], text)) for name in ("piper", "espeak"))
    assert np.abs(heard - piper).mean() < 0.5 * np.abs(heard - espeak).mean()
    assert voices.synthesize("Guten Tag.", "de").sample_rate == 22050


def test_the_natural_voice_is_english_only_and_says_so():
    with pytest.raises(UnknownVoiceError, match="English only"):
        voices.render("Guten Tag.", "de", "joe")
    with pytest.raises(UnknownLanguageError, match="klingon"):
        voices.render("Hello.", "klingon", "joe")
    with pytest.raises(UnknownLanguageError, match="English only"):
        PiperBackend().render("Bonjour.", "fr", "alloy", "neutral", 1.0)
    voices.default_backend().resolve_voice("joe")  # a name the catalogue offers
    assert "joe" in {v.name for v in voices.list_voices()}
