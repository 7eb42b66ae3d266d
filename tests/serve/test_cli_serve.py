"""`voxtune serve` on the command line: its config, its errors, and the examples it prints."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import yaml

from tests.serve.conftest import KEYS
from voxtune.cli import main
from voxtune.metrics import speech_text, spelled_numbers
from voxtune.serve.server import examples


def test_flags_environment_and_overrides_make_the_config(capsys, monkeypatch):
    monkeypatch.setenv("VOXTUNE_API_KEY", "env-one, env-two")
    code = main(
        [
            "serve",
            "--port",
            "9001",
            "--api-key",
            "flag-key",
            "limits.max_concurrent=3",
            "--shutdown-timeout",
            "12",
            "--print-config",
        ]
    )
    config = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert config["port"] == 9001 and config["limits"]["max_concurrent"] == 3
    assert config["limits"]["shutdown_timeout_seconds"] == 12
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
        done = subprocess.run(
            [sys.executable, "-m", "voxtune.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
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


def test_sigterm_drains_and_an_open_server_is_warned_about(tmp_path):
    """The real process: listening beyond loopback without a key is warned about; SIGTERM ends
    a running stream with an error event and [DONE], and the process then exits."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "voxtune.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--shutdown-timeout",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = server.stdout.readline() + server.stdout.readline()
        assert "warning: listening on 0.0.0.0 without an API key" in banner
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx2.get(url + "/health", timeout=5).raise_for_status()
                break
            except httpx2.HTTPError:
                assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()
                time.sleep(0.2)
        body = {
            "model": "voxtune-tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 1000,
            "ignore_eos": True,
        }
        events = []
        with httpx2.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        server.send_signal(signal.SIGTERM)
        # uvicorn raises the signal again once it has shut down, so the status says SIGTERM.
        assert server.wait(60) in (0, -signal.SIGTERM)
    finally:
        server.kill()
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "server_shutting_down"


def test_the_printed_curl_example_gets_back_the_words_the_natural_voice_said(server, tmp_path, monkeypatch):
    """What a new user does after `make run`: the banner's `voxtune speak` line makes
    question.wav (the default English voice, Piper's, which no voxtune model trains on), and its
    curl line sends it to the built-in model, which writes back the words."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    text = examples(server, "voxtune-tiny", with_key=True)
    speak = re.search(r"`(voxtune speak [^`]+)`", text).group(1)
    curl = next(line.strip() for line in text.splitlines() if "/v1/audio/transcriptions" in line)
    voxtune = str(Path(sys.executable).with_name("voxtune"))
    monkeypatch.setenv("VOXTUNE_API_KEY", KEYS[0])
    for command in (speak.replace("voxtune", voxtune, 1), curl):
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    heard = speech_text(spelled_numbers(json.loads(done.stdout)["text"]))
    assert heard == "what is seven plus five", heard
