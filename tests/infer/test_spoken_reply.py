"""Replies spoken back: the reply's language tag, else the language heard; a style that fits."""

from __future__ import annotations

import numpy as np
import pytest

from voxtune.audio import voices
from voxtune.audio.prosody import pitch
from voxtune.infer import REPLY_STYLE, reply_voice, speak_reply
from voxtune.model import tiny
from voxtune.tags import tag


class Scripted:
    """A model whose replies are scripted per prompt; it still encodes audio as a model does."""

    knows_task_tags = True  # as voxtune's own models: it answers the voice questions

    def __init__(self, heard_language: str, heard_style: str, reply: str) -> None:
        self.inner = tiny("llama", "streaming")
        self.answers = {
            tag("task", "language"): tag("lang", heard_language),
            tag("task", "describe"): tag("style", heard_style) + tag("intent", "question"),
        }
        self.reply = reply
        self.asked: list[str] = []

    def encode_audio(self, audio):
        return self.inner.encode_audio(audio)

    def generate(self, messages, **_):
        text = next((p["text"] for p in messages[-1]["content"] if p.get("type") == "text"), "")
        self.asked.append(text)
        return self.answers.get(text, self.reply)


@pytest.fixture(scope="module")
def question():
    speech = voices.synthesize("Wie viel ist zwei plus drei?", "de")
    return [{"role": "user", "content": [{"type": "audio", "audio": speech}]}]


def test_the_reply_tag_names_the_language_and_the_speaker_sets_the_style(question):
    model = Scripted("fr", "angry", "")
    assert reply_voice(model, question, tag("lang", "de") + "fünf") == ("de", "calm")
    assert model.asked == [tag("task", "describe")]  # no need to ask which language


def test_without_a_tag_the_language_heard_is_used(question):
    model = Scripted("de", "excited", "fünf")
    spoken = speak_reply(model, question)
    assert (spoken.language, spoken.style, spoken.text) == ("de", "happy", "fünf")
    assert spoken.audio is not None and spoken.audio.duration > 0.2


def test_whispers_are_answered_in_a_whisper(question):
    whispered = speak_reply(Scripted("en", "whisper", "five"), question).audio
    spoken = speak_reply(Scripted("en", "neutral", "five"), question).audio
    # A whispered voice has almost no pitch to track; the ordinary one does.
    voiced = lambda audio: float(np.mean(~np.isnan(pitch(audio))))  # noqa: E731
    assert voiced(whispered) < 0.5 * voiced(spoken)


def test_every_style_has_a_reply_style():
    assert set(REPLY_STYLE) == set(voices.STYLES) and set(REPLY_STYLE.values()) <= set(voices.STYLES)


def test_text_only_conversations_default_to_english_neutral():
    model = Scripted("de", "sad", "hello")
    assert reply_voice(model, [{"role": "user", "content": "hi"}], "hello") == ("en", "neutral")


def test_other_architectures_get_no_task_tags(tmp_path):
    """A checkpoint of another architecture was never taught voxtune's tags: a clip alone goes
    to it as it is (no answer tag), and its spoken reply's voice is not asked about in tags."""
    import base64

    import voxtune
    from voxtune.audio import Audio, encode
    from voxtune.infer import Runtime
    from voxtune.infer.conversation import Clip, Turn
    from voxtune.model.architectures.tiny import tiny_checkpoint

    model = voxtune.load(str(tiny_checkpoint("qwen2_audio", tmp_path / "model", seconds=2)))
    clip = Audio((0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)
    part = Clip(base64.b64encode(encode(clip, "wav")).decode(), "wav")
    runtime = Runtime(model)
    try:
        prepared = runtime.prepare_chat([Turn("user", (part,))], "owner")
        assert [p["type"] for p in prepared.messages[-1]["content"]] == ["audio"]  # no task tag added
        assert runtime.voice_prompts(prepared) == []
    finally:
        runtime.close()
    spoken = speak_reply(model, [{"role": "user", "content": [{"type": "audio", "audio": clip}]}], "Hello there.")
    assert (spoken.language, spoken.style) == ("en", "neutral") and spoken.audio is not None


def test_a_streamed_reply_is_spoken_sentence_by_sentence_with_its_transcript():
    from voxtune.infer.spoken_reply import SpokenText

    speech = SpokenText()
    steps = [speech.feed(piece) for piece in ("<|la", "ng:en|>Hello", " there. How", " are you? Fi", "ne")]
    deltas = [delta for delta, _ in steps]
    assert "".join(deltas) == "Hello there. How are you? Fine"
    assert deltas[0] == ""  # a tag still being written is not text
    assert [ready for _, ready in steps if ready] == ["Hello there.", "How are you?"]
    # The whole reply may end otherwise than the pieces (a stop string cut, a tool call taken out).
    assert speech.finish("<|lang:en|>Hello there. How are you? Fine, thanks.") == (", thanks.", "Fine, thanks.")
    assert speech.finish("<|lang:en|>Hello there. How are you? Fine, thanks.") == ("", "")
    # Only what could still become a tag waits: a literal "<|" in the text is text.
    literal = SpokenText()
    assert literal.feed("Type <| then") == ("Type <| then", "")
    assert literal.finish("Type <| then <|x") == (" <|x", "Type <| then <|x")


def test_a_reply_spoken_as_it_streams_is_the_reply_spoken_whole(question):
    """The same language and style, and every sentence, as `speak_reply` gives for the whole text."""
    from voxtune.infer.spoken_reply import ReplySpeaker, SpokenText

    model = Scripted("fr", "happy", "")
    reply = "Bonjour. Comment allez-vous ? Très bien."
    speaker, speech = ReplySpeaker(model, question), SpokenText()
    for piece in ("Bonjour.", " Comment allez-vous ?", " Très bien."):
        _, ready = speech.feed(piece)
        if ready:
            speaker.say(ready, speech.raw)
    _, rest = speech.finish(reply)
    speaker.say(rest, reply)
    streamed, whole = speaker.reply(speech.said), speak_reply(model, question, reply)
    assert (streamed.text, streamed.language, streamed.style) == (whole.text, whole.language, whole.style)
    assert streamed.text == reply and streamed.language == "fr" and streamed.style == "happy"
    assert len(speaker.pieces) == 3
    # Three renders instead of one: each piece samples its own timing, so durations are close, not equal.
    assert streamed.audio.duration == pytest.approx(whole.audio.duration, rel=0.25)
