"""Where conversations' memories live between turns, processes and machines, and their durability.

An engine with a store saves every committed STM (a :class:`ConversationState`) and restores a
conversation from the store when it is opened by id, so a worker keeps nothing the store does not
hold: workers can restart, and several can share one Redis. The rules of durability live here
too: :func:`persist` (a committed STM, refused if the store moved on), :func:`overwrite` (an
explicit replacement that moves past whatever is stored) and :func:`newer_copy` (the stored copy
a worker adopts when its own is stale).

Writes are monotonic: ``put`` refuses a state whose ``stm_version`` is not newer than the stored
one (``StaleStateError``), so two workers serving the same conversation cannot silently overwrite
each other's memory; route a conversation to one worker at a time.

``open_store(url)``: ``memory://``, ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (as in
SQLAlchemy; ``sqlite://`` is a temporary in-memory database), ``redis://host:port/db`` (needs the
``redis`` extra). ``?stm_dtype=bfloat16`` on any of them stores STMs in bfloat16: half the bytes
of float32 (RxT-Beta's 176 MB memory becomes 88 MB), at the cost docs/scaling.md measures.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rxruntime.errors import ConversationError, InvalidOptionError
from rxruntime.models.config import RxTConfig
from rxruntime.snapshot import ConversationState, config_fingerprint

log = logging.getLogger(__name__)


class StaleStateError(ConversationError):
    """A newer memory for this conversation is already stored (another worker moved it on)."""


STM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The precisions a store keeps STMs in (``stm_dtype``): float32 exactly, or bfloat16 at half the bytes."""


def parse_stm_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"`` (or the torch dtype) -> the dtype; anything else is refused."""
    if isinstance(name, torch.dtype) and name in STM_DTYPES.values():
        return name
    if isinstance(name, str) and name in STM_DTYPES:
        return STM_DTYPES[name]
    raise InvalidOptionError("stm_dtype", f"must be one of {sorted(STM_DTYPES)}, got {name!r}")


class STMStore(ABC):
    """Persistent ``conversation_id -> ConversationState``.

    ``stm_dtype``: the precision :func:`persist` writes STMs in (float32, or bfloat16 at half the
    bytes); a store reads back whatever a snapshot holds, so the two can share one store."""

    stm_dtype: torch.dtype = torch.float32

    @abstractmethod
    def get(self, conversation_id: str) -> ConversationState | None: ...

    @abstractmethod
    def put(self, state: ConversationState) -> None:
        """Store ``state``; raise StaleStateError if the stored version is not older."""

    @abstractmethod
    def delete(self, conversation_id: str) -> None: ...

    def version(self, conversation_id: str) -> int | None:
        """The stored ``stm_version`` (None: nothing stored); stores override it with a cheaper read."""
        state = self.get(conversation_id)
        return None if state is None else state.stm_version

    def close(self) -> None:  # noqa: B027 - optional for stores without resources
        """Release connections."""

    def _stale(self, state: ConversationState, stored: int) -> StaleStateError:
        return StaleStateError(
            f"conversation {state.conversation_id!r}: the store holds memory v{stored}, "
            f"refusing to write v{state.stm_version}"
        )


class InMemoryStore(STMStore):
    """A dict in this process (tests, single-process serving without restarts)."""

    def __init__(self, *, stm_dtype: str | torch.dtype = "float32") -> None:
        self.stm_dtype = parse_stm_dtype(stm_dtype)
        self._data: dict[str, bytes] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, conversation_id: str) -> ConversationState | None:
        with self._lock:
            data = self._data.get(conversation_id)
        return None if data is None else ConversationState.from_bytes(data)

    def put(self, state: ConversationState) -> None:
        data = state.to_bytes()
        with self._lock:
            stored = self._versions.get(state.conversation_id, -1)
            if stored >= state.stm_version:
                raise self._stale(state, stored)
            self._data[state.conversation_id] = data
            self._versions[state.conversation_id] = state.stm_version

    def delete(self, conversation_id: str) -> None:
        with self._lock:
            self._data.pop(conversation_id, None)
            self._versions.pop(conversation_id, None)


class SQLiteStore(STMStore):
    """One SQLite file (the embedded default): durable, no server, safe across threads."""

    def __init__(self, path: str | Path = ":memory:", *, stm_dtype: str | torch.dtype = "float32") -> None:
        self.stm_dtype = parse_stm_dtype(stm_dtype)
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS stm (conversation_id TEXT PRIMARY KEY, version INTEGER NOT NULL,"
                " state BLOB NOT NULL, updated REAL NOT NULL)"
            )

    def get(self, conversation_id: str) -> ConversationState | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM stm WHERE conversation_id = ?", (conversation_id,)).fetchone()
        return None if row is None else ConversationState.from_bytes(bytes(row[0]))

    def put(self, state: ConversationState) -> None:
        data = state.to_bytes()
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO stm (conversation_id, version, state, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(conversation_id) DO UPDATE SET version = excluded.version, state = excluded.state, "
                "updated = excluded.updated WHERE excluded.version > stm.version",
                (state.conversation_id, state.stm_version, data, time.time()),
            )
            if cursor.rowcount == 0:
                row = self._db.execute(
                    "SELECT version FROM stm WHERE conversation_id = ?", (state.conversation_id,)
                ).fetchone()
                raise self._stale(state, int(row[0]) if row else -1)

    def delete(self, conversation_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM stm WHERE conversation_id = ?", (conversation_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisStore(STMStore):
    """Redis, for several workers; keys ``{prefix}{conversation_id}`` hold version + state."""

    _PUT = """
local stored = redis.call('HGET', KEYS[1], 'version')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then return tonumber(stored) end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'state', ARGV[2])
return -1
"""

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        prefix: str = "rxrt:stm:",
        client: Any = None,
        *,
        stm_dtype: str | torch.dtype = "float32",
    ) -> None:
        self.stm_dtype = parse_stm_dtype(stm_dtype)
        if client is None:
            try:
                import redis
            except ImportError:
                raise ConversationError("RedisStore needs the redis extra: pip install 'rxruntime[redis]'") from None
            # a Redis that stops answering fails a turn after 10 s instead of hanging it
            client = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
        self._redis = client
        self._prefix = prefix
        self._put = client.register_script(self._PUT)

    def get(self, conversation_id: str) -> ConversationState | None:
        data = self._redis.hget(self._prefix + conversation_id, "state")
        return None if data is None else ConversationState.from_bytes(bytes(data))

    def version(self, conversation_id: str) -> int | None:
        """One ``HGET``: a replica checks it before every turn (is its warm copy still the latest?)."""
        raw = self._redis.hget(self._prefix + conversation_id, "version")
        return None if raw is None else int(raw)

    @property
    def client(self) -> Any:
        """The Redis connection, shared with the leases and the HTTP front's shared tables under Ray."""
        return self._redis

    def put(self, state: ConversationState) -> None:
        stored = int(self._put(keys=[self._prefix + state.conversation_id], args=[state.stm_version, state.to_bytes()]))
        if stored >= 0:
            raise self._stale(state, stored)

    def delete(self, conversation_id: str) -> None:
        self._redis.delete(self._prefix + conversation_id)

    def close(self) -> None:
        self._redis.close()


def open_store(url: str) -> STMStore:
    """A store from a URL: ``memory://``, ``sqlite:///path.db``, ``redis://host:port/db``, each
    optionally with ``?stm_dtype=bfloat16`` (STMs stored at half the bytes)."""
    url, dtype = _take_stm_dtype(url)
    if url == "memory://":
        return InMemoryStore(stm_dtype=dtype)
    if url.startswith("sqlite://"):  # as SQLAlchemy: sqlite:///relative.db, sqlite:////absolute.db
        return SQLiteStore(url.removeprefix("sqlite://").removeprefix("/") or ":memory:", stm_dtype=dtype)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, stm_dtype=dtype)
    raise ConversationError(f"unknown store URL {url!r}; use memory://, sqlite:///path.db or redis://host:port/db")


def _take_stm_dtype(url: str) -> tuple[str, str]:
    """The URL without its ``stm_dtype`` query parameter, and that parameter (default float32)."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, "float32"
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    dtypes = [value for key, value in pairs if key == "stm_dtype"]
    if len(dtypes) > 1:
        raise InvalidOptionError("stm_dtype", "given more than once in the store URL")
    rest = urllib.parse.urlencode([(key, value) for key, value in pairs if key != "stm_dtype"])
    return base + ("?" + rest if rest else ""), dtypes[0] if dtypes else "float32"


# ---------------------------------------------------------------------- durability
def persist(store: STMStore, config: RxTConfig, conversation_id: str, turns: int, stm: Tensor, version: int) -> None:
    """Write a committed STM as ``version`` in the store's ``stm_dtype``; StaleStateError if the
    store holds that version or newer."""
    cpu = stm.detach().to("cpu", store.stm_dtype)
    if cpu.data_ptr() == stm.data_ptr():  # same device and dtype: a copy the caller cannot change
        cpu = cpu.clone()
    store.put(ConversationState(conversation_id, turns, version, cpu, config_fingerprint(config)))


def overwrite(
    store: STMStore, config: RxTConfig, conversation_id: str, turns: int, stm: Tensor, version: int, tries: int = 3
) -> int | None:
    """Write an STM the caller gave explicitly (a given state, ``reset``, ``load_state``): if the
    store already holds ``version`` or newer, write past it. Returns the version written, or None
    if other writers kept moving the conversation on for ``tries`` attempts."""
    for _ in range(tries):
        try:
            persist(store, config, conversation_id, turns, stm, version)
            return version
        except StaleStateError:
            stored = store.get(conversation_id)
            version = (stored.stm_version if stored is not None else version) + 1
    return None


def newer_copy(store: STMStore, config: RxTConfig, conversation_id: str, version: int) -> ConversationState | None:
    """The stored memory of a conversation if it is newer than ``version`` (another worker moved it
    on) and fits this model; None otherwise (a stored copy that does not fit is logged)."""
    stored = store.get(conversation_id)
    if stored is None or stored.stm_version <= version:
        return None
    try:
        stored.check_fits(config)
    except ConversationError:
        log.error("conversation %r: the stored memory does not fit this model", conversation_id)
        return None
    return stored
