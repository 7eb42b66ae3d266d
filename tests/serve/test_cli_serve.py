"""`voxtune serve` on the command line: its config, its errors, and the examples it prints."""

from __future__ import annotations

import socket
import subprocess
import sys

import yaml

from tests.serve.conftest import KEYS
from voxtune.cli import main
from voxtune.serve.server import examples


def test_flags_environment_and_overrides_make_the_config(capsys, monkeypatch):
    monkeypatch.setenv("VOXTUNE_API_KEY", "env-one, env-two")
    code = main(["serve", "--port", "9001", "--api-key", "flag-key", "limits.max_concurrent=3", "--print-config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert config["port"] == 9001 and config["limits"]["max_concurrent"] == 3
    assert config["api_keys"] == ["flag-key", "env-one", "env-two"]


def test_a_bad_override_is_one_line(capsys):
    assert main(["serve", "limits.max_concurent=3", "--print-config"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("voxtune: error:") and "max_concurrent" in err and "\n" not in err


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "voxtune.cli", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "cannot listen on 127.0.0.1" in done.stderr and "Traceback" not in done.stderr


def test_the_printed_python_example_works_and_prints_no_key(server, question, tmp_path, monkeypatch):
    text = examples(server, "voxtune-tiny", with_key=True)
    assert KEYS[0] not in text and "$VOXTUNE_API_KEY" in text  # the banner goes to logs: no secrets in it
    code = "\n".join(line[2:] for line in text.split("Python (pip install openai):")[1].strip("\n").splitlines())
    (tmp_path / "question.wav").write_bytes(question)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VOXTUNE_API_KEY", KEYS[0])
    exec(compile(code, "example", "exec"), {"print": lambda *a: None})
    assert (tmp_path / "reply.wav").read_bytes()[:4] == b"RIFF"
