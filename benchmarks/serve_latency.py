"""Latency and throughput of `voxtune serve`'s chat endpoint, driven by the official `openai` client.

Run from the repository root:

    .venv/bin/python benchmarks/serve_latency.py [--quick] [--requests 20] [--throughput-requests 128]
        [--concurrency 1,4,16] [--max-tokens 32] [--url http://127.0.0.1:8000 [--api-key KEY]]

Without --url it loads the built-in model (`voxtune.load()`) and serves it in-process on
127.0.0.1 (`running_server`); with --url it measures a server that is already running. Every
request is a spoken question in a WAV `input_audio` part: four arithmetic questions rendered by
the eSpeak voice, each request's clip given its own number of trailing zero samples (a few ms).
The server keeps the encoder output of a clip it has seen (keyed by its bytes), so identical
clips would skip the audio encoder; the padding makes every clip new, and the script checks
/metrics (`voxtune_audio_clips_reused_total` should not move) to show the encoder ran every time.

Measured, after a few warm-up requests:
- throughput: --throughput-requests non-streamed chat completions (max_completion_tokens --max-
  tokens, greedy, `ignore_eos` so every reply is that long) sent one at a time with a plain loop
  (the sequential baseline), then by 1, 4 and 16 concurrent clients (threads, each with its own
  `OpenAI` client). Requests/s, completion tokens/s, per-request latency, and the ratio to the
  sequential req/s: what continuous batching buys. After each run /metrics gives the engine's
  peak batch (a high-water mark over the server's life) and the mean rows per decode step of
  that run: the tokens picked by decode steps (from each reply's usage and finish_reason: the
  first token comes from the prefill, the uncounted end-of-turn token from a step) over the
  steps /metrics counted. With --url, other traffic on the server skews these two.
- latency, on an otherwise idle server, --requests streamed requests each, one at a time:
  time from sending to the first chunk with non-empty `delta.content` (modalities ["text"]);
  and with modalities ["text", "audio"], audio pcm16, the time to the first `delta.audio`
  transcript piece and to the first `delta.audio` data (the first audio byte). p50 and p95.

In-process, the benchmark's client threads share the interpreter (and its GIL) and the CPU
cores with the server, which adds to the times on a small machine; for figures of the server
alone, start `voxtune serve` in another process (or machine) and pass --url.

The client's timeouts are generous and it never retries (max_retries=0): every failure is
counted, printed, and makes the script exit with status 1.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import os
import platform
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import openai
from openai import OpenAI

from voxtune.audio import Audio, encode, voices

QUESTIONS = (
    "What is seven plus five?",
    "What is three plus four?",
    "What is nine minus two?",
    "What is six times two?",
)
TIMEOUT_S = 300.0  # per request: 16 clients on a slow CPU can queue for a while; a hang still ends
WARMUP = 2  # requests of each kind before measuring (the first ones pay for lazy initialisation)


@dataclass
class Failure:
    """One request that did not give a proper answer."""

    phase: str
    message: str


@dataclass
class Tally:
    """What a benchmark run collects: every failure, across phases."""

    failures: list[Failure] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, phase: str, error: Exception) -> None:
        """Record a failed request (thread-safe)."""
        with self.lock:
            self.failures.append(Failure(phase, f"{type(error).__name__}: {error}"))


class BadReply(Exception):
    """The server answered, but not with what a client expects (e.g. a stream without text)."""


class Clips:
    """Spoken questions as base64 WAV, each one new: clip n has n+1 zero samples appended, so
    no two requests send the same bytes (and the server's clip cache never hits)."""

    def __init__(self, questions: Sequence[str]) -> None:
        self.audio = [voices.synthesize(q, "en") for q in questions]
        self.count = 0
        self.lock = threading.Lock()

    def next(self) -> str:
        """The next unique clip, base64-encoded WAV."""
        with self.lock:
            n, self.count = self.count, self.count + 1
        base = self.audio[n % len(self.audio)]
        padded = Audio(np.concatenate([base.samples, np.zeros(n + 1, np.float32)]), base.sample_rate)
        return base64.b64encode(encode(padded, "wav")).decode()


def messages(clip: str) -> list[dict]:
    """A user turn holding one spoken question."""
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}]}]


def new_client(url: str, api_key: str | None) -> OpenAI:
    """An OpenAI client for the server at `url` that never retries (failures must show)."""
    return OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0, timeout=TIMEOUT_S)


# ---- requests ---------------------------------------------------------------------------------


def complete(client: OpenAI, model: str, clip: str, max_tokens: int) -> tuple[float, int, int]:
    """One non-streamed chat completion: (seconds, completion tokens, decode steps it took part in)."""
    start = time.perf_counter()
    # ignore_eos: every reply decodes exactly max_tokens, so every run does the same work.
    reply = client.chat.completions.create(
        model=model, messages=messages(clip), max_completion_tokens=max_tokens, extra_body={"ignore_eos": True}
    )
    seconds = time.perf_counter() - start
    if not reply.choices or reply.choices[0].message.content is None:
        raise BadReply("a reply without text")
    if reply.usage is None:
        raise BadReply("a reply without usage")
    tokens = reply.usage.completion_tokens
    # The engine picks the end-of-turn token too but does not count it; the first pick comes
    # from the prefill, every later one from a decode step.
    steps = tokens + (reply.choices[0].finish_reason == "stop") - 1
    return seconds, tokens, steps


def first_text(client: OpenAI, model: str, clip: str, max_tokens: int) -> float:
    """Seconds from sending a streamed text request to its first non-empty `delta.content`
    (the stream is read to its end, so the next request finds the server idle)."""
    start = time.perf_counter()
    seen: float | None = None
    stream = client.chat.completions.create(
        model=model, messages=messages(clip), max_completion_tokens=max_tokens, stream=True
    )
    with stream:
        for chunk in stream:
            if seen is None and chunk.choices and chunk.choices[0].delta.content:
                seen = time.perf_counter() - start
    if seen is None:
        raise BadReply("the stream ended without text")
    return seen


def first_audio(client: OpenAI, model: str, clip: str, max_tokens: int) -> tuple[float, float]:
    """Seconds from sending a streamed text+audio (pcm16) request to its first transcript piece
    and to its first audio data (the stream is read to its end)."""
    start = time.perf_counter()
    transcript: float | None = None
    data: float | None = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages(clip),
        max_completion_tokens=max_tokens,
        stream=True,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
    )
    with stream:
        for chunk in stream:
            audio = chunk.choices[0].delta.audio if chunk.choices else None
            if audio is None:
                continue
            # openai parses delta.audio into a typed object; older versions leave a dict.
            fields = audio.model_dump(exclude_none=True) if hasattr(audio, "model_dump") else dict(audio)
            now = time.perf_counter() - start
            if transcript is None and fields.get("transcript"):
                transcript = now
            if data is None and fields.get("data"):
                data = now
    if transcript is None or data is None:
        raise BadReply(f"the stream ended without {'a transcript' if transcript is None else 'audio data'}")
    return transcript, data


# ---- runs -------------------------------------------------------------------------------------


@dataclass
class Run:
    """One throughput run: how many requests, how long, what came back."""

    label: str
    clients: int
    requests: int
    seconds: float
    latencies: list[float]
    tokens: int
    failed: int
    peak_batch: float | None = None
    rows_per_step: float | None = None


def label(clients: int) -> str:
    """A throughput run's name (0 clients: the sequential baseline)."""
    return "sequential (baseline)" if clients == 0 else f"{clients} concurrent client{'s' if clients > 1 else ''}"


def sequential(
    client: OpenAI, model: str, clips: list[str], max_tokens: int, tally: Tally
) -> tuple[float, list[float], int, int]:
    """The baseline: `clips` asked one after another by one client; (wall s, latencies, tokens,
    decode-step rows)."""
    latencies, tokens, steps = [], 0, 0
    start = time.perf_counter()
    for clip in clips:
        try:
            seconds, used, stepped = complete(client, model, clip, max_tokens)
        except (openai.APIError, BadReply) as error:
            tally.fail("sequential", error)
            continue
        latencies.append(seconds)
        tokens, steps = tokens + used, steps + stepped
    return time.perf_counter() - start, latencies, tokens, steps


def concurrent(
    url: str, api_key: str | None, model: str, clips: list[str], max_tokens: int, clients: int, tally: Tally
) -> tuple[float, list[float], int, int]:
    """`clips` asked by `clients` threads, each with its own client taking the next clip when it
    is free; (wall s from the common start to the last reply, latencies, tokens, decode-step rows)."""
    todo = list(reversed(clips))
    lock = threading.Lock()
    latencies: list[float] = []
    totals = [0, 0]  # completion tokens, decode-step rows
    ready = threading.Barrier(clients + 1)  # clients are built first: their setup is not timed

    def worker(client: OpenAI) -> None:
        ready.wait()
        while True:
            with lock:
                if not todo:
                    return
                clip = todo.pop()
            try:
                seconds, used, stepped = complete(client, model, clip, max_tokens)
            except (openai.APIError, BadReply) as error:
                tally.fail(label(clients), error)
                continue
            with lock:
                latencies.append(seconds)
                totals[0] += used
                totals[1] += stepped

    with ExitStack() as stack:
        threads = []
        for _ in range(clients):
            client = stack.enter_context(new_client(url, api_key))
            threads.append(threading.Thread(target=worker, args=(client,), daemon=True))
        for thread in threads:
            thread.start()
        ready.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start, latencies, totals[0], totals[1]


def metrics(url: str) -> dict[str, float]:
    """The server's unlabelled Prometheus metrics ({} if /metrics cannot be read)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as error:
        print(f"  (could not read {url}/metrics: {error})")
        return {}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            try:
                values[name] = float(value)
            except ValueError:  # not a plain sample line; skip it rather than guess
                continue
    return values


def throughput(
    url: str, api_key: str | None, model: str, clips: Clips, args: argparse.Namespace, tally: Tally
) -> list[Run]:
    """The sequential baseline, then each concurrency level, on fresh clips each time."""
    runs = []
    for level in [0, *args.concurrency]:
        batch = [clips.next() for _ in range(args.throughput_requests)]  # encoded before the clock starts
        failed_before = len(tally.failures)
        before = metrics(url)
        if level == 0:
            with new_client(url, api_key) as client:
                seconds, latencies, tokens, rows = sequential(client, model, batch, args.max_tokens, tally)
        else:
            seconds, latencies, tokens, rows = concurrent(url, api_key, model, batch, args.max_tokens, level, tally)
        after = metrics(url)
        run = Run(
            label(level), max(level, 1), len(batch), seconds, latencies, tokens, len(tally.failures) - failed_before
        )
        if "voxtune_engine_peak_batch" in after:
            run.peak_batch = after["voxtune_engine_peak_batch"]
            steps = after["voxtune_engine_steps_total"] - before.get("voxtune_engine_steps_total", 0)
            if steps > 0:
                run.rows_per_step = rows / steps
        runs.append(run)
        print(f"  {run.label}: {len(latencies)}/{len(batch)} in {seconds:.2f} s")
    return runs


def latency(
    name: str, measure: Callable[[str], float | tuple[float, ...]], clips: Clips, count: int, tally: Tally
) -> list[tuple[float, ...]]:
    """`count` timings of `measure`, one request at a time, each on a new clip."""
    times = []
    for _ in range(count):
        clip = clips.next()
        try:
            value = measure(clip)
        except (openai.APIError, BadReply) as error:
            tally.fail(name, error)
            continue
        times.append(value if isinstance(value, tuple) else (value,))
    return times


# ---- report -----------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation); nan when there are no values."""
    return float(np.percentile(values, q)) if values else float("nan")


def ms(seconds: float) -> str:
    """Seconds as whole milliseconds ("n/a" for nan)."""
    return "n/a" if seconds != seconds else f"{seconds * 1000:.0f}"


def latency_table(rows: list[tuple[str, list[float], int]]) -> None:
    """The latency measurements as a markdown table."""
    print("| streamed request, one at a time | p50 ms | p95 ms | n | failed |")
    print("|---|---:|---:|---:|---:|")
    for name, values, failed in rows:
        print(f"| {name} | {ms(pct(values, 50))} | {ms(pct(values, 95))} | {len(values)} | {failed} |")


def throughput_table(runs: list[Run], max_tokens: int) -> None:
    """The throughput runs as a markdown table; req/s counts answered requests only."""
    base = len(runs[0].latencies) / runs[0].seconds if runs and runs[0].seconds > 0 and runs[0].latencies else None
    print(
        f"| non-streamed, max_completion_tokens={max_tokens} | req/s | tokens/s | p50 ms | p95 ms "
        "| peak batch | rows/step | vs sequential | failed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        rate = len(run.latencies) / run.seconds if run.seconds > 0 else float("nan")
        ratio = f"{rate / base:.2f}x" if base else "n/a"
        peak = "n/a" if run.peak_batch is None else f"{run.peak_batch:.0f}"
        rows = "n/a" if run.rows_per_step is None else f"{run.rows_per_step:.1f}"
        print(
            f"| {run.label} | {rate:.2f} | {run.tokens / run.seconds:.0f} | {ms(pct(run.latencies, 50))} "
            f"| {ms(pct(run.latencies, 95))} | {peak} | {rows} | {ratio} | {run.failed} |"
        )


def machine() -> str:
    """This machine in one line: CPU, cores, torch threads, date."""
    import torch  # already imported by voxtune's model; here only for the thread count

    cuda = f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads{cuda}; {datetime.datetime.now().isoformat(timespec='seconds')}"
    )


# ---- main -------------------------------------------------------------------------------------


def benchmark(
    url: str, args: argparse.Namespace, tally: Tally
) -> tuple[list[Run], list[tuple[str, list[float], int]], dict]:
    """Every measurement against the server at `url`."""
    print("synthesising the questions...")
    clips = Clips(QUESTIONS)
    with new_client(url, args.api_key) as client:
        try:
            model = client.models.list().data[0].id
        except openai.APIError as error:  # nothing to measure: say why, without a traceback
            raise SystemExit(f"cannot list the models of {url}/v1: {type(error).__name__}: {error}") from None
        print(f"model {model} at {url}; warming up...")
        start_metrics = metrics(url)
        for _ in range(WARMUP):
            try:
                complete(client, model, clips.next(), args.max_tokens)
            except (openai.APIError, BadReply) as error:
                tally.fail("warm-up", error)
        print(f"throughput, {args.throughput_requests} requests per run:")
        runs = throughput(url, args.api_key, model, clips, args, tally)

        # The audio warm-up comes after the throughput runs: its voice questions decode beside
        # the reply and would raise the peak batch before the sequential run.
        print(f"latency, {args.requests} streamed requests of each kind...")
        for _ in range(WARMUP):
            try:
                first_text(client, model, clips.next(), args.max_tokens)
                first_audio(client, model, clips.next(), args.max_tokens)
            except (openai.APIError, BadReply) as error:
                tally.fail("warm-up", error)
        failed = len(tally.failures)
        texts = latency(
            "first text", lambda c: first_text(client, model, c, args.max_tokens), clips, args.requests, tally
        )
        text_failed, failed = len(tally.failures) - failed, len(tally.failures)
        audios = latency(
            "first audio", lambda c: first_audio(client, model, c, args.max_tokens), clips, args.requests, tally
        )
        audio_failed = len(tally.failures) - failed
    rows = [
        ("time to first text (modalities text)", [t[0] for t in texts], text_failed),
        ("time to first transcript piece (text + audio, pcm16)", [t[0] for t in audios], audio_failed),
        ("time to first audio byte (text + audio, pcm16)", [t[1] for t in audios], audio_failed),
    ]
    end_metrics = metrics(url)
    cache = {
        k: end_metrics.get(k, 0) - start_metrics.get(k, 0)
        for k in ("voxtune_audio_clips_encoded_total", "voxtune_audio_clips_reused_total")
    }
    cache["sent"] = clips.count
    return runs, rows, cache if end_metrics else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (e.g. http://127.0.0.1:8000); default: start one here")
    parser.add_argument("--api-key", help="the server's API key, with --url")
    parser.add_argument("--requests", type=int, default=20, help="streamed requests per latency measurement")
    parser.add_argument("--throughput-requests", type=int, default=128, help="requests per throughput run")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_completion_tokens of every request")
    parser.add_argument("--quick", action="store_true", help="5 streamed requests each, 16 per throughput run")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.requests, args.throughput_requests = 5, 16
    tally = Tally()
    wall = time.perf_counter()

    if args.url:
        url = args.url.rstrip("/").removesuffix("/v1")
        runs, rows, cache = benchmark(url, args, tally)
    else:
        import voxtune
        from voxtune.serve.config import ServeConfig
        from voxtune.serve.server import build_runtime, running_server

        config = ServeConfig()  # default limits: 64 requests in flight, batches of up to 32
        if max(args.concurrency) > config.limits.max_concurrent:
            parser.error(f"--concurrency above the server's max_concurrent ({config.limits.max_concurrent}) gets 429s")
        print("loading the built-in model...")
        runtime = build_runtime(config, voxtune.load())
        try:
            with running_server(runtime, config) as url:
                runs, rows, cache = benchmark(url, args, tally)
        finally:
            runtime.close()

    print(f"\nthis machine: {machine()}; server {'at ' + args.url if args.url else 'in-process, built-in model'}\n")
    throughput_table(runs, args.max_tokens)
    print()
    latency_table(rows)
    if cache:
        print(
            f"\naudio encoder: {cache['voxtune_audio_clips_encoded_total']:.0f} clips encoded, "
            f"{cache['voxtune_audio_clips_reused_total']:.0f} taken from the cache, {cache['sent']} sent"
        )
    print(f"total {time.perf_counter() - wall:.0f} s")
    if tally.failures:
        print(f"\n{len(tally.failures)} failed requests:")
        counts = collections.Counter((f.phase, f.message) for f in tally.failures)  # 429s come in crowds
        for (phase, message), count in counts.items():
            print(f"  {count} x [{phase}] {message}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
