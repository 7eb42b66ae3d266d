"""The playground at `/`: a real headless Chromium (Debian's `chromium`, driven by playwright)
with a fake microphone playing a WAV file talks to the server through `/v1/realtime`; the test
sees the user's transcript and the reply appear, and the reply's audio played."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from voxtune.audio import Audio, encode, voices
from voxtune.serve.config import ServeConfig
from voxtune.serve.server import build_runtime, running_server

playwright = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium (`make test` installs it when run as root, as CI does)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium; make test installs it when run as root)")
    return path


def test_the_page_hears_the_microphone_and_plays_the_reply(builtin_model, chromium, tmp_path):
    speech = voices.synthesize("What is seven plus five?", "en")
    rate = speech.sample_rate
    silence = np.zeros(2 * rate, np.float32)
    microphone = tmp_path / "microphone.wav"
    microphone.write_bytes(encode(Audio(np.concatenate([silence[: rate // 2], speech.samples, silence]), rate), "wav"))
    config = ServeConfig()
    runtime = build_runtime(config, builtin_model)
    try:
        with running_server(runtime, config) as url, playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(
                executable_path=chromium,
                headless=True,
                args=[
                    "--use-fake-ui-for-media-stream",
                    "--use-fake-device-for-media-stream",
                    f"--use-file-for-fake-audio-capture={microphone}",
                    "--autoplay-policy=no-user-gesture-required",
                ],
            )
            try:
                page = browser.new_page()
                page.goto(url + "/")
                assert page.title() == "voxtune playground"
                page.select_option("#voice", "nova")
                page.click("#start")
                page.wait_for_function(
                    "voxtune.userTurns.length > 0 && voxtune.replies.length > 0 && voxtune.playedChunks > 0",
                    timeout=90_000,
                )
                seen = page.evaluate("voxtune")
                log = page.inner_text("#log")
            finally:
                browser.close()
    finally:
        runtime.close()
    assert seen["errors"] == []
    assert seen["userTurns"][0].strip() and seen["replies"][0].strip()
    assert seen["userTurns"][0] in log and seen["replies"][0] in log
