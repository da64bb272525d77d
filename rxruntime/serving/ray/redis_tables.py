"""What the HTTP front keeps per process, kept in Redis instead so many replicas share it (under Ray).

**The conversation table** (:class:`SharedConversations`). A single-process front keeps a
conversation's ``created_at``, ``metadata`` and the turn of its latest response (what
``previous_response_id`` may continue) in its own table. Behind a load balancer any replica may get
the next request of any conversation, so under Ray these live in one Redis hash per conversation
(``rxrt:conv:<id>``) next to its STM, and every replica reads them from there. Without this, a
conversation created on one replica would be unknown (404) to the others until its first memory
update is stored, and its metadata would differ from replica to replica. It is the
:class:`~rxruntime.serving.http.registry.ConversationTable` the HTTP registry writes through to.

**Chat Completions' history cache** (:class:`SharedHistoryCache`). The single-process
:class:`~rxruntime.serving.http.history_cache.HistoryCache` keeps STMs in one process. Under Ray a
stateless client's next request may reach another replica (its first one died, or was scaled
away), which would then replay the whole history. This subclass keeps the local cache as it is
(pending entries are futures only this process can wait for) and writes every resolved STM to Redis
as well, under ``rxrt:hist:<key>`` with a TTL, so any replica finds it. An STM is stored as
safetensors bytes (never pickled): ``layers x slots x dim`` values in the model's dtype, the same
size as one store write.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from rxruntime.serving.http.history_cache import HistoryCache
from rxruntime.serving.http.registry import SharedMeta

log = logging.getLogger(__name__)


class SharedConversations:
    """``conversation_id -> SharedMeta`` in Redis (every call is one round trip and may block)."""

    def __init__(self, client: Any, prefix: str = "rxrt:conv:") -> None:
        self._redis = client
        self._prefix = prefix

    def create(self, conversation_id: str, meta: SharedMeta) -> None:
        mapping: dict[str, Any] = {"created_at": meta.created_at, "metadata": json.dumps(meta.metadata)}
        if meta.seed is not None:
            mapping["seed"] = meta.seed
        self._redis.hset(self._prefix + conversation_id, mapping=mapping)

    def load(self, conversation_id: str) -> SharedMeta | None:
        raw = self._redis.hgetall(self._prefix + conversation_id)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        last, seed = fields.get("last_response_turn"), fields.get("seed")
        return SharedMeta(
            created_at=int(fields.get("created_at", 0)),
            metadata=dict(json.loads(fields.get("metadata", "{}"))),
            last_response_turn=int(last) if last is not None else None,
            seed=int(seed) if seed is not None else None,
        )

    def set_metadata(self, conversation_id: str, metadata: dict[str, str]) -> None:
        self._redis.hset(self._prefix + conversation_id, "metadata", json.dumps(metadata))

    def set_last_response(self, conversation_id: str, turn: int) -> None:
        self._redis.hset(self._prefix + conversation_id, "last_response_turn", turn)

    def delete(self, conversation_id: str) -> None:
        self._redis.delete(self._prefix + conversation_id)


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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
