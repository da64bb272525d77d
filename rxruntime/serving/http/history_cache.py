"""The STM of a chat history, cached under a hash of its turns (Chat Completions' replay cache).

A stateless client resends the whole history every turn. The STM after ``system`` + the first ``k``
(user, assistant) pairs is stored under a chained hash of exactly those texts (whitespace at the
ends ignored): the key of ``k + 1`` pairs hashes the key of ``k`` with the next pair, so one pass
gives the key of every prefix and the longest cached prefix is found without rehashing.

An entry is a future: the STM after an answer is only known once that answer's memory update has
committed, which may be after the client already has the answer and sends the next request. That
request waits for the pending entry instead of replaying the history itself. A future that
resolves to ``None`` (the update failed or the turn was cancelled) counts as absent.

Bounded: least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future

from torch import Tensor

Pair = tuple[str, str]


def prefix_keys(system: str | None, pairs: Sequence[Pair]) -> list[str]:
    """``keys[k]``: the key of the history ``system`` + ``pairs[:k]``, for k = 0..len(pairs)."""
    keys = [hashlib.sha256(json.dumps(["system", (system or "").strip()]).encode()).hexdigest()]
    for user, assistant in pairs:
        keys.append(extend_key(keys[-1], user, assistant))
    return keys


def extend_key(prefix_key: str, user: str, assistant: str) -> str:
    """The key of the history one (user, assistant) pair longer than the one ``prefix_key`` names."""
    return hashlib.sha256(json.dumps([prefix_key, user.strip(), assistant.strip()]).encode()).hexdigest()


class HistoryCache:
    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Future[Tensor | None]] = OrderedDict()
        self._lock = threading.Lock()

    def longest(self, keys: Sequence[str]) -> tuple[int, Future[Tensor | None]] | None:
        """The longest cached prefix: (number of pairs it covers, its entry), or None."""
        if self.capacity <= 0:
            return None
        with self._lock:
            for k in range(len(keys) - 1, -1, -1):
                entry = self._entries.get(keys[k])
                if entry is not None:
                    self._entries.move_to_end(keys[k])
                    return k, entry
        return None

    def reserve(self, key: str) -> Future[Tensor | None]:
        """A pending entry for ``key``; resolve it with the STM (a CPU tensor) or ``None``."""
        future: Future[Tensor | None] = Future()
        if self.capacity <= 0:
            return future
        with self._lock:
            self._entries[key] = future
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        future.add_done_callback(lambda f: self._drop_if_empty(key, f))
        return future

    def put(self, key: str, stm: Tensor) -> None:
        self.reserve(key).set_result(stm)

    def discard(self, key: str, entry: Future[Tensor | None]) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _drop_if_empty(self, key: str, future: Future[Tensor | None]) -> None:
        if future.cancelled() or future.exception() is not None or future.result() is None:
            self.discard(key, future)
