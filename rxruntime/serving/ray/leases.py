"""Per-conversation leases in Redis: at most one turn of a conversation runs at a time, anywhere.

Several replicas share one Redis store, and any of them may be asked for any conversation. The
store's monotonic ``stm_version`` check would catch two replicas writing the same memory, but only
after one of them has answered from a stale STM; a lease prevents it. A replica takes the lease of
a conversation before it reads the STM for a turn and gives it back once that turn's memory
update has committed, so the next holder always reads the last committed memory.

Within one replica, a turn waiting for a lease the same replica holds (its previous turn's memory
update still committing) waits on a local condition instead of polling Redis, so it starts the
moment that update commits. Across replicas it polls every ``poll_s``.

A lease is ``SET rxrt:lease:<id> <token> NX PX <ttl>``: it expires on its own, so the leases of a
replica killed with ``kill -9`` lapse after ``ttl_s`` and the conversation moves on elsewhere. A
live holder renews its leases from one thread every ``ttl_s / 3``. Release and renewal compare the
token first (a Lua script), so a holder whose lease lapsed (a process paused past its TTL) can
never delete its successor's; that holder's late memory write is then refused by the store's
version check instead.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from rxruntime.errors import ConversationError

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ConversationBusyError(ConversationError):
    """Another turn of this conversation held its lease for longer than the caller would wait."""


class Lease:
    """One held lease; ``release`` is idempotent."""

    def __init__(self, leases: Leases, conversation_id: str, token: str) -> None:
        self.conversation_id = conversation_id
        self.token = token
        self.lost = False  # renewal found another holder: this one lapsed
        self._leases = leases
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._leases._release(self)


class Leases:
    """The leases one replica holds, renewed in the background until released."""

    def __init__(self, client: Any, *, ttl_s: float = 10.0, prefix: str = "rxrt:lease:", poll_s: float = 0.05) -> None:
        self._redis = client
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._prefix = prefix
        self._poll_s = poll_s
        self._renew = client.register_script(_RENEW)
        self._release_script = client.register_script(_RELEASE)
        self._held: dict[str, Lease] = {}
        self._local: dict[str, Lease] = {}  # conversation -> the lease this process holds on it
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="rxrt-leases", daemon=True)
        self._thread.start()

    @property
    def client(self) -> Any:
        return self._redis

    @property
    def ttl_s(self) -> float:
        return self._ttl_ms / 1000

    def acquire(self, conversation_id: str, wait_s: float = 30.0) -> Lease:
        """Take the conversation's lease, waiting up to ``wait_s`` for its holder to give it back.

        Raises ConversationBusyError after ``wait_s``; a Redis error propagates (the turn must not
        run without the lease)."""
        token = uuid.uuid4().hex
        key = self._prefix + conversation_id
        deadline = time.monotonic() + wait_s
        with self._released:  # held here already: wait for its release without polling Redis
            while conversation_id in self._local:
                if not self._released.wait(max(0.0, deadline - time.monotonic())):
                    raise self._busy(conversation_id, wait_s)
            self._local[conversation_id] = Lease(self, conversation_id, token)  # reserved
        try:
            self._take(key, token, conversation_id, deadline, wait_s)
        except BaseException:
            with self._released:
                self._local.pop(conversation_id, None)
                self._released.notify_all()
            raise
        lease = self._local[conversation_id]
        with self._lock:
            self._held[token] = lease
        return lease

    def _take(self, key: str, token: str, conversation_id: str, deadline: float, wait_s: float) -> None:
        while not self._redis.set(key, token, nx=True, px=self._ttl_ms):
            if time.monotonic() >= deadline:
                raise self._busy(conversation_id, wait_s)
            time.sleep(self._poll_s)

    @staticmethod
    def _busy(conversation_id: str, wait_s: float) -> ConversationBusyError:
        return ConversationBusyError(
            f"conversation {conversation_id!r}: another turn of it is still running "
            f"(waited {wait_s:g} s for it to finish)"
        )

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def close(self) -> None:
        """Stop renewing (held leases then lapse after their TTL unless released)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _release(self, lease: Lease) -> None:
        with self._lock:
            self._held.pop(lease.token, None)
        try:
            self._release_script(keys=[self._prefix + lease.conversation_id], args=[lease.token])
        except Exception as exc:  # Redis down: the lease lapses on its own after its TTL
            log.warning("could not release lease %r (%s); it lapses in %.0f s", lease.conversation_id, exc, self.ttl_s)
        finally:
            with self._released:
                if self._local.get(lease.conversation_id) is lease:
                    del self._local[lease.conversation_id]
                self._released.notify_all()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._ttl_ms / 3000):
            with self._lock:
                held = list(self._held.values())
            for lease in held:
                try:
                    key = self._prefix + lease.conversation_id
                    if not int(self._renew(keys=[key], args=[lease.token, self._ttl_ms])):
                        lease.lost = True
                        log.warning("the lease of conversation %r lapsed before its turn ended", lease.conversation_id)
                        with self._released:
                            self._held.pop(lease.token, None)
                            if self._local.get(lease.conversation_id) is lease:
                                del self._local[lease.conversation_id]
                            self._released.notify_all()
                except Exception as exc:
                    log.warning("could not renew the lease of %r: %s", lease.conversation_id, exc)
