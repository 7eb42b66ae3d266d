"""Realtime voice latency: from the end of the user's speech to the first audio of the reply.

Run from the repository root (about 2 minutes):

    .venv/bin/python benchmarks/realtime_latency.py [--sessions 1,4,16] [--turns 3]

It starts `voxtune serve` (the built-in model) as a separate process and, for each number of
concurrent sessions, opens that many `/v1/realtime` WebSockets (server VAD with its defaults:
threshold 0.5, 300 ms prefix, 500 ms of silence ends a turn). Each session streams `--turns`
spoken questions (synthesised; 0.5 s of silence before, 1.5 s after) as 24 kHz pcm16 in 20 ms
pieces at real-time pace, and measures, per turn:

- VAD wait: from sending the piece that holds the last speech sample to
  `input_audio_buffer.speech_stopped` (the silence the detector needs, plus its work);
- model time: from `speech_stopped` to the first `response.output_audio.delta` (what is left
  of encoding, prefill, decoding up to the first sentence, and speaking it);
- total: the two together, what the user waits.

It runs twice: on the server's default, where a turn's reply starts when the speech pauses
(while the silence that confirms the end of the turn runs), and on a second server started with
`realtime_early_replies=false`, where it starts when the turn has ended. The baseline is the
same model answering the same turn as one HTTP request sent at the end of speech
(`/v1/chat/completions`, streamed, spoken reply in pcm16), by as many concurrent clients: its
time to the first audio chunk. The last line:

    realtime_model_p50_ms=<1 session> late_model_p50_ms=<1 session> realtime_total_p50_ms=<1 session> \
        http_p50_ms=<1 session> ratio=<http / model>
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import threading
import time

import httpx2
import numpy as np
import websockets.sync.client as ws
from served import voxtune_serve

from voxtune.audio import Audio, encode, voices

QUESTIONS = ("What is seven plus five?", "What is three plus four?", "What is nine minus two?")
PIECE_S = 0.02


def turn_audio(text: str) -> tuple[bytes, int]:
    """24 kHz pcm16 of `text` with silence around it, and the byte offset where speech ends."""
    speech = voices.synthesize(text, "en").resample(24000).samples
    before, after = np.zeros(12000, np.float32), np.zeros(36000, np.float32)
    data = encode(Audio(np.concatenate([before, speech, after]), 24000), "pcm16")
    return data, 2 * (len(before) + len(speech))


def realtime_session(url: str, turns: list[tuple[bytes, int]], results: list[tuple[float, float]]) -> None:
    """Stream each turn at real-time pace; (VAD wait, model time) of each."""
    piece = int(24000 * PIECE_S) * 2
    with ws.connect(url.replace("http://", "ws://") + "/v1/realtime?model=voxtune-tiny", max_size=None) as connection:
        json.loads(connection.recv())  # session.created
        for data, speech_end in turns:
            stopped = first_audio = None
            done = False
            ended = time.perf_counter()
            start = time.perf_counter()
            for index, offset in enumerate(range(0, len(data), piece)):
                connection.send(
                    json.dumps(
                        {
                            "type": "input_audio_buffer.append",
                            "audio": base64.b64encode(data[offset : offset + piece]).decode(),
                        }
                    )
                )
                if offset <= speech_end < offset + piece:
                    ended = time.perf_counter()
                while True:  # events that arrived meanwhile
                    try:
                        event = json.loads(connection.recv(timeout=0))
                    except TimeoutError:
                        break
                    stopped, first_audio = _note(event, stopped, first_audio)
                    done = done or event["type"] == "response.done"
                delay = start + (index + 1) * PIECE_S - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            while not done:
                event = json.loads(connection.recv(timeout=120))
                stopped, first_audio = _note(event, stopped, first_audio)
                done = event["type"] == "response.done"
            if stopped is not None and first_audio is not None:
                results.append((stopped - ended, first_audio - stopped))


def _note(event: dict, stopped: float | None, first_audio: float | None) -> tuple[float | None, float | None]:
    now = time.perf_counter()
    if event["type"] == "input_audio_buffer.speech_stopped" and stopped is None:
        stopped = now
    if event["type"] == "response.output_audio.delta" and first_audio is None:
        first_audio = now
    return stopped, first_audio


def http_turn(url: str, data: bytes, speech_end: int, results: list[float]) -> None:
    """The same turn as one streamed HTTP request sent at the end of speech: time to first audio."""
    clip = Audio(np.frombuffer(data[:speech_end], "<i2").astype(np.float32) / 32768.0, 24000)
    body = {
        "model": "voxtune-tiny",
        "stream": True,
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "pcm16"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(encode(clip, "wav")).decode(), "format": "wav"},
                    }
                ],
            }
        ],
    }
    started = time.perf_counter()
    with httpx2.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"data":' in line:
                results.append(time.perf_counter() - started)
                break


def pct(values: list[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q)) if values else float("nan")


def sessions_at_once(
    url: str, count: int, turns: list[tuple[bytes, int]], per_session: int
) -> list[tuple[float, float]]:
    """`count` realtime sessions at once, each streaming `per_session` turns: (VAD wait, model time) of each turn."""
    results: list[tuple[float, float]] = []
    threads = [
        threading.Thread(
            target=realtime_session, args=(url, [turns[(i + t) % len(turns)] for t in range(per_session)], results)
        )
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,4,16", help="concurrent sessions to measure, comma-separated")
    parser.add_argument("--turns", type=int, default=3, help="spoken turns per session")
    args = parser.parse_args()
    rows = []
    turns = [turn_audio(q) for q in QUESTIONS]
    with voxtune_serve() as (url, _), voxtune_serve(["realtime_early_replies=false"]) as (late_url, _):
        for server in (url, late_url):  # warm-up: lazy initialisation on every path
            realtime_session(server, turns[:1], [])
        http_turn(url, *turns[0], [])
        for count in (int(n) for n in args.sessions.split(",")):
            realtime = sessions_at_once(url, count, turns, args.turns)
            late = sessions_at_once(late_url, count, turns, args.turns)
            http: list[float] = []
            for turn in range(args.turns):
                threads = [
                    threading.Thread(target=http_turn, args=(url, *turns[(i + turn) % len(turns)], http))
                    for i in range(count)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            vad, model = [r[0] for r in realtime], [r[1] for r in realtime]
            total = [a + b for a, b in realtime]
            rows.append((count, vad, model, [r[1] for r in late], total, http))
    print(
        f"realtime latency, {datetime.date.today()}, {platform.machine()} with {os.cpu_count()} CPUs, built-in model, "
        f"{args.turns} turns per session (ms: p50 / p95)"
    )
    print(
        f"\n{'sessions':>8} {'turns':>6} {'VAD wait':>14} {'model time':>14} {'(reply at end)':>15} {'total':>14} "
        f"{'HTTP first audio':>18} {'HTTP/model':>11}"
    )
    for count, vad, model, late, total, http in rows:
        print(
            f"{count:>8} {len(total):>6} {pct(vad, 50):>6.0f} / {pct(vad, 95):<5.0f} "
            f"{pct(model, 50):>6.0f} / {pct(model, 95):<5.0f} {pct(late, 50):>7.0f} / {pct(late, 95):<5.0f} "
            f"{pct(total, 50):>6.0f} / {pct(total, 95):<5.0f} {pct(http, 50):>8.0f} / {pct(http, 95):<7.0f} "
            f"{pct(http, 50) / pct(model, 50):>10.2f}x"
        )
    count, vad, model, late, total, http = rows[0]
    print(
        f"realtime_model_p50_ms={pct(model, 50):.0f} late_model_p50_ms={pct(late, 50):.0f} "
        f"realtime_total_p50_ms={pct(total, 50):.0f} http_p50_ms={pct(http, 50):.0f} "
        f"ratio={pct(http, 50) / pct(model, 50):.2f}"
    )


if __name__ == "__main__":
    main()
