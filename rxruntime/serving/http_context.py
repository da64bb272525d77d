"""Everything one HTTP app holds, in one object the routes receive (no module-level state).

``create_app`` builds one per app, so several apps (tests, Ray Serve replicas) can live in one
process without sharing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import anyio.to_thread
from anyio import CapacityLimiter

from rxruntime.serving.http_auth import KeyRing
from rxruntime.serving.http_history import HistoryCache
from rxruntime.serving.http_lifecycle import EngineSlot
from rxruntime.serving.http_metrics import Metrics
from rxruntime.serving.http_registry import Registry

T = TypeVar("T")


@dataclass
class Context:
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
