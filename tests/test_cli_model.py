"""`voxtune chat` and `voxtune transcribe` on a saved model: the same answers as the Python API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import voxtune
from voxtune.audio import encode, voices
from voxtune.model import tiny

VOXTUNE = str(Path(sys.executable).with_name("voxtune"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-model")
    tiny("qwen2", "streaming", seed=5).save_pretrained(folder / "model")
    speech = voices.synthesize("Hello there.", "en")
    (folder / "hello.wav").write_bytes(encode(speech, "wav"))
    return folder


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VOXTUNE, *args], capture_output=True, text=True, timeout=120)


def test_transcribe_prints_what_the_api_returns(saved):
    result = run("transcribe", "--model", str(saved / "model"), str(saved / "hello.wav"), "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    expected = voxtune.load(saved / "model").transcribe(saved / "hello.wav", max_new_tokens=12)
    assert result.stdout == expected + "\n"
    assert result.stderr == ""  # no progress bars or library notes


def test_chat_with_audio_and_text_streamed_or_not(saved):
    args = [
        "chat",
        "--model",
        str(saved / "model"),
        "--audio",
        str(saved / "hello.wav"),
        "--text",
        "Who?",
        "--max-new-tokens",
        "10",
    ]
    whole, streamed = run(*args), run(*args, "--stream")
    assert whole.returncode == 0 and streamed.returncode == 0, whole.stderr + streamed.stderr
    model = voxtune.load(saved / "model")
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio": saved / "hello.wav"}, {"type": "text", "text": "Who?"}]}
    ]
    assert whole.stdout == streamed.stdout == model.generate(messages, max_new_tokens=10) + "\n"


@pytest.mark.parametrize(
    "args, words",
    [
        (["transcribe", "--model", "{model}", "{wav}", "--language", "xx"], "no language tag for 'xx'"),
        (["transcribe", "--model", "{missing}", "{wav}"], "no model directory"),
        (["transcribe", "--model", "{model}", "{missing}"], "no such file"),
        (["chat", "--model", "{model}"], "give --audio FILE"),
        (["chat", "--model", "{model}", "--text", "hi", "--voice", "nova"], "--voice is the voice of --speak"),
        (["chat", "--model", "{model}", "--text", "hi", "--speak", "-"], "--speak needs a file name"),
        (
            ["chat", "--model", "{model}", "--text", "hi", "--speak", "{missing}.mp3", "--voice", "nobody"],
            "unknown voice 'nobody'",
        ),
        (["chat", "--model", "{model}", "--text", "hi", "--temperature", "-1"], "temperature"),
    ],
)
def test_bad_input_is_one_line(saved, cli, args, words):
    fill = {"wav": saved / "hello.wav", "model": saved / "model", "missing": saved / "nope"}
    result = cli(*(a.format(**fill) for a in args))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxtune: error:") and words in lines[0], result.stderr


def test_train_runs_a_recipe_end_to_end_and_resumes(tmp_path, cli):
    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    overrides = [
        f"output.dir={tmp_path / 'run'}",
        f"data.train=[{tmp_path / 'data' / 'train.jsonl'}]",
        f"data.valid=[{tmp_path / 'data' / 'valid.jsonl'}]",
        "train.max_steps=4",
        "eval.every=4",
        "eval.limit=2",
        "eval.max_new_tokens=4",
        "model.tiny.hidden=32",
        f"data.synth={recipe.parent / 'data' / 'smoke.yaml'}",  # the quickstart's own corpus takes longer
    ]
    first = cli("train", recipe, *overrides, "--stop-after", "2")
    assert first.returncode == 0, first.stderr
    assert "stopped at step 2; go on with --resume" in first.stdout
    second = cli("train", recipe, *overrides, "--resume")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "wer=" in second.stdout
    assert voxtune.load(tmp_path / "run" / "model").config.encoder_kind == "streaming"


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "{recipe}", "optim.lrr=1"], "unknown key optim.lrr (did you mean optim.lr?)"),
        (
            ["train", "{recipe}", "train.method=qlora", "train.lora.lm=false", "train.lora.encoder=true"],
            "with lora.lm=false use method lora",
        ),
        (["train", "{recipe}", "--resume", "output.dir={empty}", "data.train=[{missing}]"], "no such manifest"),
    ],
)
def test_train_bad_input_is_one_line(tmp_path, cli, args, words):
    fill = {
        "recipe": Path(__file__).parents[1] / "recipes" / "quickstart.yaml",
        "empty": tmp_path / "e",
        "missing": tmp_path / "none.jsonl",
    }
    result = cli(*(a.format(**fill) for a in args))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
