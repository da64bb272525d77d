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
    """The app's metrics. Per-request series carry a ``model`` label (the served model's id), as
    scrapers of several servers expect; the engine gauges describe the one engine and have none."""

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, engine_stats: Callable[[], dict[str, int]], model: str = "rxt") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model = model
        r = self.registry
        self.requests = Counter(
            "rxrt_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        tokens = Counter(
            "rxrt_tokens", "Tokens read (prompt) and generated (completion)", ["model", "kind"], registry=r
        )
        self.prompt_tokens = tokens.labels(model, "prompt")
        self.completion_tokens = tokens.labels(model, "completion")

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=r).labels(model)

        self.ttft = histogram(
            "rxrt_time_to_first_token_seconds", "Query received to first token (queueing included)", _LATENCY_BUCKETS
        )
        self.inter_token = histogram(
            "rxrt_inter_token_latency_seconds",
            "Time between two consecutive tokens of an answer, one observation per gap, as the front receives them",
            _PER_TOKEN_BUCKETS,
        )
        self.e2e = histogram("rxrt_e2e_request_latency_seconds", "Query received to the answer's end", _LATENCY_BUCKETS)
        self.queue_time = histogram(
            "rxrt_queue_time_seconds", "Query received to the turn joining the decode batch", _LATENCY_BUCKETS
        )
        self.memory_update = histogram(
            "rxrt_memory_update_seconds", "Encoder + memory attention per turn", _LATENCY_BUCKETS
        )
        self.stm_versions = Counter(
            "rxrt_stm_versions_written", "STM versions committed by memory updates", ["model"], registry=r
        ).labels(model)
        self.finished = Counter(
            "rxrt_requests_finished", "Answers by finish reason", ["model", "finish_reason"], registry=r
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
