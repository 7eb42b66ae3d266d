"""The `voxtune` command: each subcommand end to end, and one clean line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import voxtune
from voxtune.cli import DEMO_SENTENCES, main

VOXTUNE = [str(Path(sys.executable).with_name("voxtune"))]


def run(*args: str | bytes, stdin: bytes | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it; output decoded as UTF-8."""
    result = subprocess.run(VOXTUNE + list(args), capture_output=True, input=stdin, timeout=60, **kwargs)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def test_version_and_help():
    assert run("--version").stdout.strip() == f"voxtune {voxtune.__version__}"
    help_text = run("--help").stdout
    for command in ("speak", "info", "voices", "demo"):
        assert command in help_text


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "aac", "pcm16"])
def test_speak_writes_each_format_that_info_reads_back(tmp_path, capsys, fmt):
    out = tmp_path / f"hello.{fmt}"
    assert main(["speak", "Hello there. How are you?", "--format", fmt, "--voice", "nova", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    seconds = float(printed.rsplit(", ", 1)[1].split(" s)")[0])
    if fmt == "pcm16":  # raw 24 kHz 16-bit samples
        assert out.stat().st_size / 2 / 24000 == pytest.approx(seconds, abs=0.01)
        return
    assert main(["info", "--json", str(out)]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["duration"] == pytest.approx(seconds, abs=0.05) and item["channels"] == 1  # one codec frame
    assert not item["silent"]
    assert item["codec"].startswith({"wav": "pcm", "mp3": "mp3", "flac": "pcm", "opus": "opus", "aac": "aac"}[fmt])


def test_speak_takes_its_format_from_the_suffix_and_text_from_stdin(tmp_path):
    out = tmp_path / "from-stdin.mp3"
    result = run(
        "speak",
        "-",
        "--lang",
        "de",
        "--style",
        "happy",
        "--speed",
        "1.5",
        "--out",
        str(out),
        stdin=b"Guten Morgen!",
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:3] == b"ID3" or out.read_bytes()[0] == 0xFF


def test_speak_to_standard_output():
    result = subprocess.run(
        VOXTUNE + ["speak", "Hello.", "--format", "flac", "--out", "-"], capture_output=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout[:4] == b"fLaC"
    assert b"standard output" in result.stderr


def test_info_prints_one_line_per_file_and_fails_for_bad_ones(tmp_path, capsys):
    good = tmp_path / "good.wav"
    assert main(["speak", "Hi.", "--out", str(good)]) == 0
    (tmp_path / "bad.wav").write_bytes(b"\x00\x01garbage")
    capsys.readouterr()
    assert main(["info", str(good), str(tmp_path / "bad.wav")]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: wav (pcm_16), 22050 Hz, 1 ch,")
    assert captured.err.startswith(f"voxtune: error: {tmp_path / 'bad.wav'}: unrecognised audio data")


def test_voices_lists_voices_and_languages(capsys):
    assert main(["voices", "--json"]) == 0
    names = [v["name"] for v in json.loads(capsys.readouterr().out)]
    assert names[:2] == ["alloy", "ash"] and "marin" in names
    assert main(["voices", "--languages"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 100


def test_demo_speaks_every_language(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"hello-{lang}.wav" for lang in DEMO_SENTENCES)
    assert str(tmp_path / "hello-en.wav") in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, words",
    [
        (["info", "/no/such/file.wav"], "no such file"),
        (["info", "{garbage}"], "unrecognised audio data"),
        (["speak", "Hi.", "--voice", "nobody", "--out", "{out}"], "unknown voice 'nobody'"),
        (["speak", "Hi.", "--lang", "xx-yy", "--out", "{out}"], "unknown language 'xx-yy'"),
        (["speak", "Hi.", "--style", "sarcastic", "--out", "{out}"], "invalid choice: 'sarcastic'"),
        (["speak", "Hi.", "--speed", "fast", "--out", "{out}"], "invalid float value: 'fast'"),
        (["speak", "Hi.", "--speed", "10", "--out", "{out}"], "speed must be between"),
        (["speak", "   ", "--out", "{out}"], "nothing to speak"),
        (["speak", "Hi.", "--format", "ogg", "--out", "{out}"], "invalid choice: 'ogg'"),
        (["speak", "Hi.", "--out", "{out}.m4a"], "--format"),
        (["speak", "Hi."], "required: --out"),
        (["speak", "Hi.", "--out", "/proc/voxtune-cannot-write/x.wav"], "/proc/voxtune-cannot-write"),
        (["speak", "Hi.", "--out", "{garbage_dir}"], "is a directory"),
        (["info"], "required: FILE"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, cli, args, words):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio, just some words" * 3)
    out = tmp_path / "out.wav"
    out.write_bytes(b"previous contents")
    result = cli(*(a.format(garbage=garbage, out=out, garbage_dir=tmp_path) for a in args))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxtune: error:"), result.stderr
    assert words in lines[0]
    assert out.read_bytes() == b"previous contents"  # a failed command never touches the output


@pytest.mark.parametrize("case", ["undecodable-argument", "undecodable-stdin", "closed-stdin"])
def test_text_that_cannot_be_read_is_one_line(tmp_path, case):
    out = str(tmp_path / "out.wav")
    if case == "undecodable-argument":
        result = run("speak", b"\xff\xfe hi", "--out", out)
    elif case == "undecodable-stdin":
        result = run("speak", "-", "--out", out, stdin=b"\xff\xfe hello")
    else:
        result = run("speak", "-", "--out", out, stdin=None, preexec_fn=lambda: os.close(0))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxtune: error:"), result.stderr
    assert not os.path.exists(out)


def test_data_synth_makes_a_corpus_and_reports_its_rate(tmp_path):
    recipe = Path(__file__).parents[1] / "recipes" / "data" / "smoke.yaml"
    result = run(
        "data", "synth", str(recipe), "--out", str(tmp_path / "corpus"), "clips=8", "--holdout-voices", "m1,f2"
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 8 clips" in result.stdout and "audio hours per minute" in result.stdout
    lines = sum(len((tmp_path / "corpus" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "valid", "test"))
    assert lines == 8
    assert "holdout_voices:\n- m1\n- f2" in (tmp_path / "corpus" / "recipe.yaml").read_text()


@pytest.mark.parametrize(
    "args, words",
    [
        (["data", "synth", "{recipe}", "--out", "{out}", "clipz=3"], "unknown key clipz (did you mean clips?)"),
        (["data", "synth", "{recipe}", "--out", "{out}", "languages=[xx]"], "no phrasebook"),
        (["data", "synth", "{missing}", "--out", "{out}"], "no such recipe"),
        (["data", "synth", "{recipe}", "--out", "{out}", "--frobnicate"], "unrecognized arguments"),
    ],
)
def test_data_synth_bad_input_is_one_line(tmp_path, cli, args, words):
    fill = {
        "recipe": Path(__file__).parents[1] / "recipes" / "data" / "smoke.yaml",
        "out": tmp_path / "o",
        "missing": tmp_path / "none.yaml",
    }
    result = cli(*(a.format(**fill) for a in args))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert not (tmp_path / "o").exists()
