"""``GET /metrics``: Prometheus counters, gauges and histograms of one HTTP app.

Each app has its own ``CollectorRegistry`` (no process-global metrics), so two apps in one process
(tests, or several Ray Serve replicas) never mix their numbers. Gauges read the engine when
scraped, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, engine_stats: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "rxrt_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.tokens = Counter("rxrt_tokens", "Tokens read (input) and generated (output)", ["kind"], registry=r)
        self.ttft = Histogram(
            "rxrt_time_to_first_token_seconds", "Query received to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.per_token = Histogram(
            "rxrt_time_per_output_token_seconds",
            "Mean decode time per token after the first, per answer",
            buckets=_PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.memory_update = Histogram(
            "rxrt_memory_update_seconds", "Encoder + memory attention per turn", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.store_errors = Counter("rxrt_store_errors", "Failed reads or writes of the STM store", registry=r)
        self.replay = Counter(
            "rxrt_history_replay",
            "Chat Completions history lookups: hit (STM cached), partial (a prefix cached), miss",
            ["result"],
            registry=r,
        )
        self.replayed_turns = Counter(
            "rxrt_history_replayed_turns", "Earlier turns written to memory by replay (no decoding)", registry=r
        )
        self.finished = Counter(
            "rxrt_requests_finished", "Answers by finish reason", ["model", "finish_reason"], registry=r
        )
        self.cancelled = Counter("rxrt_turns_cancelled", "Turns cancelled by a client that went away", registry=r)
        self._engine_stats = engine_stats
        queue = Gauge("rxrt_queue_depth", "Turns accepted but not started", registry=r)
        queue.set_function(lambda: self._stat("queue_depth"))
        conversations = Gauge("rxrt_open_conversations", "Conversations open in the engine", registry=r)
        conversations.set_function(lambda: self._stat("open_conversations"))
        active = Gauge("rxrt_active_turns", "Turns in the decode batch", registry=r)
        active.set_function(lambda: self._stat("active_turns"))
        resident = Gauge(
            "rxrt_resident_conversations", "Open conversations whose STM is in memory (not evicted)", registry=r
        )
        resident.set_function(lambda: self._stat("resident_conversations"))
        backlog = Gauge("rxrt_memory_backlog", "Memory updates waiting to run", registry=r)
        backlog.set_function(lambda: self._stat("memory_backlog"))

    def _stat(self, name: str) -> float:
        try:
            return float(self._engine_stats().get(name, 0))
        except Exception:  # engine still loading or closed: report 0 rather than fail the scrape
            return 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
