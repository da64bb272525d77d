"""The conversations the HTTP front has open, with their owner, metadata and latest response.

The memory itself lives in the engine (and in its store, if it has one); this table adds what the
Conversations and Responses APIs report about a conversation. A conversation the engine's store
knows but this process has not opened (after a restart) is resumed on first use; its metadata did
not survive the restart and reads as empty.

With a store, the table is bounded (``max_open``): past it, conversations idle for a while are
closed in the engine, least recently used first, and reopen from the store on their next request.
Without a store nothing is closed, since closing would lose the memory.

Every method may block (the store, replaying initial items): call them from a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from rxruntime.conversation import Conversation
from rxruntime.engine import Engine
from rxruntime.events import MemoryUpdated
from rxruntime.models.errors import RxTError
from rxruntime.serving.http_auth import new_id, owns
from rxruntime.serving.http_errors import from_engine_error, not_found
from rxruntime.serving.http_metrics import Metrics
from rxruntime.stores import StaleStateError

PREFIX = "conv"


def replay_pairs(conv: Conversation, pairs: Sequence[tuple[str, str]]) -> None:
    """Write past (query, answer) pairs to memory, in chunks the engine's per-conversation queue takes."""
    chunk = max(1, conv.backend.max_turns_per_conversation)
    for start in range(0, len(pairs), chunk):
        conv.replay(list(pairs[start : start + chunk]))


@dataclass
class Entry:
    conv: Conversation
    created_at: int
    metadata: dict[str, str] = field(default_factory=dict)
    last_response_turn: int | None = None  # the turn of the latest answer (for previous_response_id)
    used: float = field(default_factory=time.monotonic)


class Registry:
    def __init__(self, metrics: Metrics, max_open: int = 10_000, idle_s: float = 60.0) -> None:
        self._metrics = metrics
        self._max_open = max_open
        self._idle_s = idle_s  # a conversation used more recently is never closed to make room
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._metadata: dict[str, dict[str, str]] = {}  # kept when a conversation is closed to make room
        self._lock = threading.Lock()

    def create(
        self,
        engine: Engine,
        owner: str,
        *,
        metadata: dict[str, str] | None = None,
        memory_init: str | None = None,
        history: Sequence[tuple[str, str]] = (),
    ) -> Entry:
        """A new conversation; ``memory_init`` and ``history`` are written to its memory first."""
        conversation_id = new_id(PREFIX, owner)
        try:
            conv = engine.conversation(conversation_id, memory_init=memory_init)
        except Exception as exc:
            self._count_store_error(exc)
            raise from_engine_error(exc) from exc
        entry = self._watch(Entry(conv, int(time.time()), dict(metadata or {})))
        if history:
            try:
                replay_pairs(conv, history)
            except Exception as exc:
                self._drop(entry)
                raise from_engine_error(exc, "items") from exc
            self._metrics.replayed_turns.inc(len(history))
        with self._lock:
            self._entries[conversation_id] = entry
        self._make_room(engine)
        return entry

    def get(self, engine: Engine, owner: str, conversation_id: str, param: str = "conversation") -> Entry:
        """The caller's conversation, resumed from the store if need be; 404 for anything else."""
        if not owns(owner, conversation_id, PREFIX):
            raise not_found(f"conversation {conversation_id!r}", param)
        with self._lock:
            entry = self._entries.get(conversation_id)
            if entry is not None:
                entry.used = time.monotonic()
                self._entries.move_to_end(conversation_id)
        if entry is not None:
            return entry
        store = engine.store
        try:
            stored = store is not None and store.get(conversation_id) is not None
        except Exception as exc:
            self._metrics.store_errors.inc()
            raise from_engine_error(exc) from exc
        if not stored:
            raise not_found(f"conversation {conversation_id!r}", param)
        with self._lock:  # two requests may resume the same id at once: one opens, both use it
            entry = self._entries.get(conversation_id)
            if entry is None:
                try:
                    conv = engine.conversation(conversation_id)
                except Exception as exc:
                    self._count_store_error(exc)
                    raise from_engine_error(exc) from exc
                metadata = self._metadata.pop(conversation_id, {})
                entry = self._watch(Entry(conv, int(time.time()), metadata))
                self._entries[conversation_id] = entry
        self._make_room(engine)
        return entry

    def delete(self, engine: Engine, owner: str, conversation_id: str) -> None:
        """Close the conversation and remove its memory from the store."""
        entry = self.get(engine, owner, conversation_id)
        with self._lock:
            self._entries.pop(conversation_id, None)
            self._metadata.pop(conversation_id, None)
        try:
            entry.conv.delete()
        except Exception as exc:
            self._count_store_error(exc)
            raise from_engine_error(exc) from exc

    def forget(self, conversation_id: str) -> None:
        """Close a conversation nobody can reach again (a ``store: false`` response's own)."""
        with self._lock:
            entry = self._entries.pop(conversation_id, None)
        if entry is not None:
            self._drop(entry)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # ------------------------------------------------------------------ helpers
    def _watch(self, entry: Entry) -> Entry:
        """Memory-update durations of every turn (also those no client waits for) go to /metrics."""
        histogram = self._metrics.memory_update

        def on_memory(event: object) -> None:
            if isinstance(event, MemoryUpdated):
                histogram.observe(event.duration_s)

        entry.conv.memory_events.subscribe(on_memory)
        return entry

    def _make_room(self, engine: Engine) -> None:
        """Close idle conversations beyond ``max_open`` (only with a store: they reopen from it)."""
        if engine.store is None:
            return
        now = time.monotonic()
        with self._lock:
            excess = len(self._entries) - self._max_open
            victims: list[str] = []
            for cid, entry in self._entries.items():
                if len(victims) >= excess:
                    break
                if now - entry.used >= self._idle_s and entry.conv.wait_for_memory(timeout=0):
                    victims.append(cid)
            for cid in victims:
                entry = self._entries.pop(cid)
                self._metadata[cid] = entry.metadata
                entry.conv.close()

    def _drop(self, entry: Entry) -> None:
        """Close and, with a store, delete: nothing of the conversation outlives it."""
        try:
            if entry.conv.backend.store is not None:
                entry.conv.delete()
            else:
                entry.conv.close()
        except Exception as exc:
            self._count_store_error(exc)

    def _count_store_error(self, exc: BaseException) -> None:
        if not isinstance(exc, RxTError) or isinstance(exc, StaleStateError):
            self._metrics.store_errors.inc()
