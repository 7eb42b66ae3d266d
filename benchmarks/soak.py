"""Soak test of `voxtune serve`: N clients for M minutes, with abusive requests beside them.

Run from the repository root (3 minutes plus about 30 s of set-up by default):

    .venv/bin/python benchmarks/soak.py [--clients 8] [--minutes 3] [--store-mb 16] [--no-abuse]

It starts `voxtune serve` (the built-in model) as a separate process on a free port, so its
memory is the server's alone, and drives it with `--clients` threads for `--minutes`. Each
client loops over a mix of requests, each with a clip it has not sent before (a synthesised
question at a random gain, so the audio store takes a new entry every time): 60 % chat with
audio in and text out, 10 % chat with a spoken reply (mp3), 15 % transcriptions, 15 % speech.

Beside them, unless --no-abuse, one abusive client cycles through what a hostile caller sends:
20 MB of text, 590 s of audio (past what the context holds), a body that never finishes, and a
speech stream it never reads (each held 10 s). A prober asks /health twice a second all along.

Reported: per kind, requests, errors, requests/s, p50/p95 latency; what the abusive requests
got; /health latency (p50, p95, max); the server's resident memory (VmRSS) every 15 s with the
audio store's bytes; and the last line

    requests_per_s=<x> errors=<n> health_p95_ms=<y> rss_mb=<r> store_mb=<s> rss_over_store_mb=<c>

where rss_over_store_mb is the resident memory at the end minus the store's bytes: the constant
the README documents (memory levels off at the store's budget plus it). The clients share the
machine's cores with the server, so on a small machine their own work adds to the latencies.
Exits 1 if any normal request failed.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import random
import re
import socket
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx2
import numpy as np
from served import voxtune_serve

from voxtune.audio import Audio, encode, voices

QUESTIONS = ("What is seven plus five?", "What is three plus four?", "Name a colour of the sky.", "How are you today?")
MIX = (("chat", 0.60), ("chat+speech", 0.10), ("transcription", 0.15), ("speech", 0.15))
HELD = 10.0  # seconds an abusive connection is kept open
TIMEOUT = 120.0


@dataclass
class Record:
    """What the clients saw, by kind of request."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    abuse: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    health: list[float] = field(default_factory=list)
    memory: list[tuple[float, float, float]] = field(default_factory=list)  # (t, rss MiB, store MiB)
    lock: threading.Lock = field(default_factory=threading.Lock)


def rss_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


def store_mib(url: str) -> float:
    body = httpx2.get(url + "/metrics", timeout=TIMEOUT).text
    return float(re.search(r"^voxtune_audio_store_bytes (\S+)$", body, re.M).group(1)) / (1 << 20)


class Clips:
    """Spoken questions; each `fresh()` call gives one at a new random gain (new bytes)."""

    def __init__(self, seed: int) -> None:
        self.speech = [voices.synthesize(q, "en") for q in QUESTIONS]
        self.random = random.Random(seed)
        self.lock = threading.Lock()

    def fresh(self) -> bytes:
        with self.lock:
            clip, gain = self.random.choice(self.speech), self.random.uniform(0.3, 0.9)
        return encode(
            Audio(clip.samples * gain / max(1e-6, float(np.abs(clip.samples).max())), clip.sample_rate), "wav"
        )


def one_request(client: httpx2.Client, kind: str, clip: bytes) -> None:
    """Send one request of `kind`; raises on anything but a proper answer."""
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": "wav"}}
    if kind in ("chat", "chat+speech"):
        body = {"model": "voxtune-tiny", "messages": [{"role": "user", "content": [part]}], "max_completion_tokens": 16}
        if kind == "chat+speech":
            body |= {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "mp3"}}
        response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        assert response.json()["choices"][0]["message"], "no message"
    elif kind == "transcription":
        response = client.post("/v1/audio/transcriptions", files={"file": ("q.wav", clip)}, data={"model": "whisper-1"})
        response.raise_for_status()
        assert "text" in response.json()
    else:
        text = random.choice(QUESTIONS)
        response = client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": text})
        response.raise_for_status()
        assert len(response.content) > 1000, "too little audio"


def client_loop(url: str, clips: Clips, deadline: float, record: Record, seed: int) -> None:
    chooser = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    with httpx2.Client(base_url=url, timeout=TIMEOUT) as client:
        while time.monotonic() < deadline:
            kind = chooser.choices(kinds, weights)[0]
            clip = clips.fresh()
            started = time.monotonic()
            try:
                one_request(client, kind, clip)
            except Exception as error:  # noqa: BLE001 - every failure is counted and printed
                with record.lock:
                    record.errors[kind].append(f"{type(error).__name__}: {str(error)[:200]}")
                continue
            with record.lock:
                record.latencies[kind].append(time.monotonic() - started)


def abuse_loop(url: str, clips: Clips, deadline: float, record: Record) -> None:
    """One abusive request after another, each of a different kind."""
    host, port = url.removeprefix("http://").split(":")
    long_audio = clips.speech[0]
    repeats = int(np.ceil(590 / long_audio.duration))
    long = encode(
        Audio(np.tile(long_audio.samples, repeats)[: 590 * long_audio.sample_rate], long_audio.sample_rate), "wav"
    )
    huge = json.dumps({"model": "voxtune-tiny", "messages": [{"role": "user", "content": "hello " * 3_400_000}]})
    long_body = json.dumps(
        {
            "model": "voxtune-tiny",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "input_audio",
                            "input_audio": {"data": base64.b64encode(long).decode(), "format": "wav"},
                        }
                    ],
                }
            ],
        }
    )
    speech = json.dumps(
        {"model": "tts-1", "voice": "alloy", "input": "One more sentence. " * 200, "response_format": "pcm"}
    )
    kinds = ("huge text", "long audio", "slow body", "unread stream")
    turn = 0
    while time.monotonic() < deadline:
        kind = kinds[turn % len(kinds)]
        turn += 1
        if kind in ("huge text", "long audio"):
            response = httpx2.post(
                url + "/v1/chat/completions",
                content=huge if kind == "huge text" else long_body,
                headers={"Content-Type": "application/json"},
                timeout=TIMEOUT,
            )
            with record.lock:
                record.abuse[kind].append(response.status_code)
            continue
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        if kind == "slow body":
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        else:
            sock.sendall(
                f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: {len(speech)}\r\n\r\n{speech}".encode()
            )
        time.sleep(HELD)
        sock.close()
        with record.lock:
            record.abuse[kind].append(0)  # held and dropped: nothing to read


def probe_loop(url: str, deadline: float, record: Record) -> None:
    with httpx2.Client(base_url=url, timeout=TIMEOUT) as client:
        while time.monotonic() < deadline:
            started = time.monotonic()
            client.get("/health").raise_for_status()
            with record.lock:
                record.health.append(time.monotonic() - started)
            time.sleep(0.5)


def memory_loop(url: str, pid: int, started: float, deadline: float, record: Record) -> None:
    while time.monotonic() < deadline:
        record.memory.append((time.monotonic() - started, rss_mib(pid), store_mib(url)))
        time.sleep(15)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument(
        "--store-mb",
        type=float,
        default=16.0,
        help="the server's audio store budget (small enough to fill within the run)",
    )
    parser.add_argument("--no-abuse", action="store_true", help="no abusive client")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with voxtune_serve([f"audio_store_mb={args.store_mb}"]) as (url, server):
        clips = Clips(args.seed)
        with httpx2.Client(base_url=url, timeout=TIMEOUT) as warm:  # lazy initialisation, before measuring
            for kind, _ in MIX:
                one_request(warm, kind, clips.fresh())
        record = Record()
        started = time.monotonic()
        end = started + args.minutes * 60
        threads = [
            threading.Thread(target=client_loop, args=(url, clips, end, record, args.seed + i))
            for i in range(args.clients)
        ]
        threads += [
            threading.Thread(target=probe_loop, args=(url, end, record)),
            threading.Thread(target=memory_loop, args=(url, server.pid, started, end, record)),
        ]
        if not args.no_abuse:
            threads.append(threading.Thread(target=abuse_loop, args=(url, clips, end, record)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        final_rss, final_store = rss_mib(server.pid), store_mib(url)

    print(
        f"voxtune serve soak, {datetime.date.today()}, {platform.machine()} with {os.cpu_count()} CPUs: "
        f"{args.clients} clients, {args.minutes:g} min, audio store {args.store_mb:g} MB, "
        f"abuse {'off' if args.no_abuse else 'on'}"
    )
    print(f"\n{'kind':<15}{'requests':>9}{'errors':>8}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}")
    total = errors = 0
    for kind, _ in MIX:
        done, failed = record.latencies[kind], record.errors[kind]
        total, errors = total + len(done), errors + len(failed)
        print(
            f"{kind:<15}{len(done):>9}{len(failed):>8}{len(done) / elapsed:>8.2f}"
            f"{pct(done, 50) * 1000:>9.0f}{pct(done, 95) * 1000:>9.0f}"
        )
    print(f"{'all':<15}{total:>9}{errors:>8}{total / elapsed:>8.2f}")
    for kind, statuses in record.abuse.items():
        print(f"abusive {kind}: {len(statuses)} sent, statuses {sorted(set(statuses))} (0: held, then dropped)")
    health = record.health
    print(
        f"/health: {len(health)} probes, p50 {pct(health, 50) * 1000:.0f} ms, p95 {pct(health, 95) * 1000:.0f} ms, "
        f"max {max(health) * 1000:.0f} ms"
    )
    print(
        "memory: "
        + ", ".join(f"{t:.0f}s {rss:.0f}/{store:.0f}" for t, rss, store in record.memory)
        + f", end {final_rss:.0f}/{final_store:.0f} (RSS MiB / store MiB)"
    )
    for kind, failed in record.errors.items():
        for message in failed[:3]:
            print(f"error ({kind}): {message}")
    print(
        f"requests_per_s={total / elapsed:.2f} errors={errors} health_p95_ms={pct(health, 95) * 1000:.0f} "
        f"rss_mb={final_rss:.0f} store_mb={final_store:.1f} rss_over_store_mb={final_rss - final_store:.0f}"
    )
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
