"""`voxtune serve` in a process of its own, for the benchmarks that measure the server alone
(its memory is its own, its CPU use is not the clients')."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx2


@contextmanager
def voxtune_serve(settings: Sequence[str] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `voxtune serve` (the built-in model) on a free port with `settings` (KEY=VALUE
    overrides); yields (base URL, process) once /health answers; stops it afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "voxtune.cli", "serve", "--port", str(port), *settings],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx2.get(url + "/health", timeout=2).raise_for_status()
                break
            except httpx2.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}") from None
                time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        server.wait(60)
