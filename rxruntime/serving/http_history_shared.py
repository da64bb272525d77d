"""Chat Completions' history cache shared by every replica through Redis.

The single-process :class:`~rxruntime.serving.http_history.HistoryCache` keeps STMs in one
process. Under Ray a stateless client's next request may reach another replica (its first one
died, or was scaled away), which would then replay the whole history. This subclass keeps the
local cache as it is (pending entries are futures only this process can wait for) and writes
every resolved STM to Redis as well, under ``rxrt:hist:<key>`` with a TTL, so any replica finds it.

An STM is stored as safetensors bytes (never pickled): ``layers x slots x dim`` values in the
model's dtype, the same size as one store write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from rxruntime.serving.http_history import HistoryCache

log = logging.getLogger(__name__)


class SharedHistoryCache(HistoryCache):
    def __init__(self, client: Any, capacity: int = 512, *, ttl_s: float = 3600.0, prefix: str = "rxrt:hist:") -> None:
        super().__init__(capacity)
        self._redis = client
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._prefix = prefix

    def longest(self, keys: Sequence[str]) -> tuple[int, Future[Tensor | None]] | None:
        """The longest prefix cached here or in Redis (Redis is asked only for longer ones)."""
        local = super().longest(keys)
        start = local[0] + 1 if local is not None else 0
        candidates = list(range(len(keys) - 1, start - 1, -1))
        if not candidates or self.capacity <= 0:
            return local
        try:
            pipe = self._redis.pipeline(transaction=False)
            for k in candidates:
                pipe.exists(self._prefix + keys[k])
            present = [k for k, found in zip(candidates, pipe.execute()) if found]
            for k in present:
                data = self._redis.get(self._prefix + keys[k])
                if data is not None:
                    future: Future[Tensor | None] = Future()
                    future.set_result(load_tensors(bytes(data))["stm"])
                    return k, future
        except Exception as exc:  # the cache is an optimisation: replaying is always correct
            log.warning("shared history cache unreadable (%s); replaying", exc)
        return local

    def reserve(self, key: str) -> Future[Tensor | None]:
        future = super().reserve(key)
        future.add_done_callback(lambda f: self._publish(key, f))
        return future

    def _publish(self, key: str, future: Future[Tensor | None]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        stm = future.result()
        if stm is None or self.capacity <= 0:
            return
        try:
            data = save_tensors({"stm": stm.detach().to("cpu").contiguous()})
            self._redis.set(self._prefix + key, data, px=self._ttl_ms)
        except Exception as exc:
            log.warning("could not share a chat history's STM (%s); other replicas will replay it", exc)
