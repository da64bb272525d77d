"""The conversations the HTTP front has open, with their owner, metadata and latest response.

The memory itself lives in the engine (and in its store, if it has one); this table adds what the
Conversations and Responses APIs report about a conversation. A conversation the engine's store
knows but this process has not opened (after a restart) is resumed on first use; its metadata did
not survive the restart and reads as empty.

With a store, the table is bounded (``max_open``): past it, conversations idle for a while are
closed in the engine, least recently used first, and reopen from the store on their next request.
Without a store nothing is closed, since closing would lose the memory.

With ``shared`` (a :class:`ConversationTable`; under Ray the Redis one in
``rxruntime.serving.ray.redis_tables``) the owner-visible facts (``created_at``, metadata, latest
response) live there instead, read on every request and written through, so every replica reports
the same; ``refresh`` drops a replica's open copy of a conversation whose memory another replica
has moved on.

Every method may block (the store, replaying initial items): call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rxruntime.conversation import Conversation
from rxruntime.engine import Engine
from rxruntime.events import MemoryUpdated
from rxruntime.models.errors import RxTError
from rxruntime.serving.http.errors import from_engine_error, not_found
from rxruntime.serving.http.metrics import Metrics
from rxruntime.serving.ownership import new_id, owns
from rxruntime.stores import StaleStateError

PREFIX = "conv"
# Names the conversation a response belongs to, so a proxy (the Ray ingress) can take its lease
# and route its next turns without parsing the body.
CONVERSATION_HEADER = "x-rxrt-conversation"


@dataclass
class SharedMeta:
    """What a shared table holds of one conversation besides its memory."""

    created_at: int
    metadata: dict[str, str] = field(default_factory=dict)
    last_response_turn: int | None = None
    seed: int | None = None  # the starting STM's seed, for a replica that opens it before any update


class ConversationTable(Protocol):
    """A conversation table shared by several processes (Redis under Ray); every call may block."""

    def create(self, conversation_id: str, meta: SharedMeta) -> None: ...
    def load(self, conversation_id: str) -> SharedMeta | None: ...
    def set_metadata(self, conversation_id: str, metadata: dict[str, str]) -> None: ...
    def set_last_response(self, conversation_id: str, turn: int) -> None: ...
    def delete(self, conversation_id: str) -> None: ...


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
    def __init__(
        self,
        metrics: Metrics,
        max_open: int = 10_000,
        idle_s: float = 60.0,
        shared: ConversationTable | None = None,
    ) -> None:
        self._metrics = metrics
        self._shared = shared
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
        seed: int | None = None,
    ) -> Entry:
        """A new conversation; ``memory_init`` and ``history`` are written to its memory first.
        ``seed`` fixes its starting STM (otherwise drawn from its random id)."""
        conversation_id = new_id(PREFIX, owner)
        try:
            conv = engine.conversation(conversation_id, memory_init=memory_init, seed=seed)
        except Exception as exc:
            self._count_store_error(exc)
            raise from_engine_error(exc) from exc
        entry = self._watch(Entry(conv, int(time.time()), dict(metadata or {})))
        if self._shared is not None:
            try:
                self._shared.create(conversation_id, SharedMeta(entry.created_at, entry.metadata, seed=seed))
            except Exception as exc:
                self._drop(entry)
                self._metrics.store_errors.inc()
                raise from_engine_error(exc) from exc
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
        shared = None
        store = engine.store
        try:
            if self._shared is not None:
                shared = self._shared.load(conversation_id)
            if entry is not None:
                if shared is not None:  # another replica may have answered or changed it since
                    entry.metadata, entry.last_response_turn = shared.metadata, shared.last_response_turn
                return entry
            stored = shared is not None or (store is not None and store.get(conversation_id) is not None)
        except Exception as exc:
            self._metrics.store_errors.inc()
            raise from_engine_error(exc) from exc
        if not stored:
            raise not_found(f"conversation {conversation_id!r}", param)
        with self._lock:  # two requests may resume the same id at once: one opens, both use it
            entry = self._entries.get(conversation_id)
            if entry is None:
                try:  # the creator's seed, should no memory update have reached the store yet
                    conv = engine.conversation(conversation_id, seed=shared.seed if shared is not None else None)
                except Exception as exc:
                    self._count_store_error(exc)
                    raise from_engine_error(exc) from exc
                metadata = self._metadata.pop(conversation_id, {})
                entry = self._watch(Entry(conv, int(time.time()), metadata))
                if shared is not None:
                    entry.created_at, entry.metadata = shared.created_at, shared.metadata
                    entry.last_response_turn = shared.last_response_turn
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
            if self._shared is not None:
                self._shared.delete(conversation_id)
        except Exception as exc:
            self._count_store_error(exc)
            raise from_engine_error(exc) from exc

    def set_metadata(self, entry: Entry, metadata: dict[str, str]) -> None:
        """Replace the conversation's metadata (in Redis too, when shared)."""
        if self._shared is not None:
            try:
                self._shared.set_metadata(entry.conv.id, metadata)
            except Exception as exc:
                self._metrics.store_errors.inc()
                raise from_engine_error(exc) from exc
        entry.metadata = metadata

    def answered(self, entry: Entry, turn: int) -> None:
        """Record the conversation's latest response (the one ``previous_response_id`` may continue)."""
        entry.last_response_turn = turn
        if self._shared is not None:
            try:
                self._shared.set_last_response(entry.conv.id, turn)
            except Exception:  # the answer is out; only an older previous_response_id check is weakened
                self._metrics.store_errors.inc()

    def refresh(self, engine: Engine, conversation_id: str) -> bool:
        """True if this process holds the conversation open with the store's latest memory.

        An open copy older than the store (another replica served a turn since) is closed, so the
        next ``get`` reopens it from the store: a turn never reads an STM older than the last one
        committed. Call it while holding the conversation's lease."""
        with self._lock:
            entry = self._entries.get(conversation_id)
        if entry is None or engine.store is None:
            return entry is not None
        stored = engine.store.version(conversation_id)
        try:
            fresh = stored is None or entry.conv.stm_version >= stored
        except RxTError:  # closed underneath us
            fresh = False
        if fresh:
            return True
        with self._lock:
            if self._entries.get(conversation_id) is entry:
                del self._entries[conversation_id]
                self._metadata.pop(conversation_id, None)
        with contextlib.suppress(RxTError):
            entry.conv.close()
        return False

    def entry(self, conversation_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(conversation_id)

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
        histogram, versions = self._metrics.memory_update, self._metrics.stm_versions

        def on_memory(event: object) -> None:
            if isinstance(event, MemoryUpdated):
                histogram.observe(event.duration_s)
                versions.inc()

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
