"""Serial delivery: run callbacks in order, one at a time, off the engine's threads.

reactivex forbids concurrent ``on_next`` calls to one observer, and a subscriber's callback may be
slow. The engine therefore never calls user code itself: it posts callbacks to the conversation's
:class:`Mailbox`, which drains them in FIFO order on a shared thread pool (one drain at a time per
mailbox). A slow subscriber delays only its own conversation's deliveries; the decode loop keeps
stepping every other conversation. A mailbox's backlog is bounded by what its own turns produce
(at most ``max_seq_len`` tokens plus a few control events per turn).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

log = logging.getLogger(__name__)


class Mailbox:
    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._queue: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._draining = False
        self._idle = threading.Event()
        self._idle.set()

    def post(self, callback: Callable[[], None]) -> None:
        """Queue ``callback``; it runs after every callback posted before it. Never blocks."""
        with self._lock:
            self._queue.append(callback)
            if self._draining:
                return
            self._draining = True
            self._idle.clear()
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # executor shut down: deliver inline so nothing is lost
            self._drain()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    self._idle.set()
                    return
                callback = self._queue.popleft()
            try:
                callback()
            except Exception:  # a subscriber's bug must not stop delivery to the others
                log.exception("event callback raised")

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until everything posted so far has been delivered."""
        return self._idle.wait(timeout)
