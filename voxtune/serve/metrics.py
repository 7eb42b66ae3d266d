"""`/metrics`: the server's counters in Prometheus's text format, through `prometheus_client`.

The numbers live where they are counted (the audio store, the engine, the gate, the realtime
sessions); a collector reads them at each scrape, so nothing is counted twice. Each app has its
own registry, so that several servers in one process (the tests) do not share series.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from voxtune.serve.realtime.session import EarlyReplies

if TYPE_CHECKING:
    from voxtune.infer.runtime import Runtime
    from voxtune.serve.gate import GateStats
    from voxtune.serve.realtime import Sessions

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics(Collector):
    """What `/metrics` reports, read from the runtime, the gate and the realtime sessions."""

    def __init__(self, runtime: Runtime, gate: GateStats, sessions: Sessions) -> None:
        self.runtime, self.gate, self.sessions = runtime, gate, sessions
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        """The text a scrape gets."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        store, engine, gate = self.runtime.store.stats, self.runtime.engine, self.gate
        yield CounterMetricFamily(
            "voxtune_audio_clips_encoded", "User clips run through the audio encoder.", value=store.clips_encoded
        )
        yield CounterMetricFamily(
            "voxtune_audio_clips_reused",
            "User clips taken from the audio store instead of encoded again.",
            value=store.clips_reused,
        )
        yield GaugeMetricFamily("voxtune_audio_store_entries", "Clips and replies in the audio store.", store.entries)
        yield GaugeMetricFamily("voxtune_audio_store_bytes", "Memory the audio store holds.", store.bytes)
        yield CounterMetricFamily(
            "voxtune_audio_store_evicted", "Store entries dropped for memory.", value=store.evicted
        )
        yield CounterMetricFamily(
            "voxtune_audio_store_expired", "Store entries dropped at their expiry.", value=store.expired
        )
        yield GaugeMetricFamily("voxtune_engine_active", "Conversations being decoded now.", engine.active)
        yield GaugeMetricFamily(
            "voxtune_engine_peak_batch", "Most conversations decoded in one step.", engine.peak_batch
        )
        yield CounterMetricFamily("voxtune_engine_steps", "Decode steps run.", value=engine.steps)
        yield GaugeMetricFamily(
            "voxtune_realtime_sessions", "Realtime WebSocket sessions open now.", self.sessions.active
        )
        early = CounterMetricFamily(
            "voxtune_realtime_early_replies",
            "Replies started while a turn's ending silence ran: used (the turn ended there) or "
            "dropped (the user spoke on).",
            labels=["outcome"],
        )
        for outcome, count in asdict(self.sessions.early_replies or EarlyReplies()).items():  # zeros when off
            early.add_metric([outcome], count)
        yield early
        yield GaugeMetricFamily("voxtune_requests_in_flight", "API requests being served now.", gate.in_flight)
        yield CounterMetricFamily(
            "voxtune_requests_rejected", "Requests turned away at the concurrency limit (429).", value=gate.rejected
        )
        requests = CounterMetricFamily("voxtune_requests", "API requests answered.", labels=["path", "status"])
        for (path, status), count in sorted(gate.responses.items()):
            requests.add_metric([path, str(status)], count)
        yield requests
