"""Everything one HTTP app holds, in one object the routes receive, and its engine through its life.

``create_app`` builds one :class:`Context` per app (no module-level state), so several apps
(tests, Ray Serve replicas) can live in one process without sharing anything.

The engine sits in an :class:`EngineSlot`: the app can be given a ready engine or a function that
loads one. Loading runs on a worker thread after the server has started listening, so ``/health``
answers 503 ``loading`` at once instead of the port staying closed for as long as the weights take
to load; every other route answers 503 until the engine is ready, and again once shutdown has begun.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter

from rxruntime.engine import Engine
from rxruntime.serving.http.bearer import KeyRing
from rxruntime.serving.http.errors import unavailable
from rxruntime.serving.http.history_cache import HistoryCache
from rxruntime.serving.http.metrics import Metrics
from rxruntime.serving.http.registry import Registry

T = TypeVar("T")
log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed", "shutting_down"]


class EngineSlot:
    """The engine behind an app through its life: loading, ready, failed, shutting down."""

    def __init__(self, engine: Engine | Callable[[], Engine], *, owns_engine: bool | None = None) -> None:
        self._engine: Engine | None = engine if isinstance(engine, Engine) else None
        self._loader = None if isinstance(engine, Engine) else engine
        # An engine we load is ours to close; one we are handed belongs to the caller unless told.
        self.owns_engine = owns_engine if owns_engine is not None else self._loader is not None
        self._status: Status = "ready" if self._engine is not None else "loading"
        self._error: str | None = None
        self._ready = threading.Event()
        if self._engine is not None:
            self._ready.set()
        self._thread: threading.Thread | None = None
        self.on_ready: list[Callable[[Engine], None]] = []

    @property
    def status(self) -> Status:
        return self._status

    @property
    def error(self) -> str | None:
        return self._error

    def start_loading(self) -> None:
        """Load on a thread (no-op for a given engine); ``on_ready`` callbacks run when done."""
        if self._loader is None:
            for callback in self.on_ready:
                callback(self.engine)
            return
        loader = self._loader

        def load() -> None:
            try:
                engine = loader()
            except Exception as exc:
                log.exception("loading the model failed")
                self._error = f"{type(exc).__name__}: {exc}"
                self._status = "failed"
                return
            self._engine = engine
            if self._status == "shutting_down":  # stopped while loading
                if self.owns_engine:
                    engine.close()
                return
            self._status = "ready"
            self._ready.set()
            for callback in self.on_ready:
                callback(engine)

        self._thread = threading.Thread(target=load, name="rxrt-http-load", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def engine(self) -> Engine:
        """The engine, or a 503 APIError while loading, after a failed load or during shutdown."""
        if self._status == "ready" and self._engine is not None:
            return self._engine
        if self._status == "loading":
            raise unavailable("the model is still loading; retry shortly", "loading")
        if self._status == "failed":
            raise unavailable(f"the model failed to load ({self._error})", "load_failed")
        raise unavailable("the server is shutting down", "shutting_down")

    def peek(self) -> Engine | None:
        """The engine if there is one, whatever the status (for metrics)."""
        return self._engine

    def begin_shutdown(self) -> None:
        """From now on new requests get 503; turns already running finish."""
        self._status = "shutting_down"

    def close(self) -> None:
        self.begin_shutdown()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._engine is not None and self.owns_engine:
            self._engine.close()


@dataclass
class Context:
    """What one app holds; every route receives it."""

    slot: EngineSlot
    keys: KeyRing
    metrics: Metrics
    registry: Registry
    history: HistoryCache
    model_name: str
    max_body_bytes: int
    limiter: CapacityLimiter  # worker threads for blocking engine and store calls
    background: ThreadPoolExecutor  # work that outlives its request (caching a chat's STM, closing it)

    async def blocking(self, fn: Callable[[], T]) -> T:
        """Run a blocking call (store, replay, snapshot) off the event loop."""
        return await anyio.to_thread.run_sync(fn, limiter=self.limiter)
