"""A bounded, thread-safe event buffer that feeds an async consumer (``Conversation.astream``).

Events arrive on a delivery thread; the consumer runs in an asyncio or trio event loop. The
buffer never blocks the producer and never grows without bound:

* ``overflow="coalesce"`` (default): when ``size`` events are waiting, a new ``Token`` is merged
  into the newest waiting ``Token`` of the same turn (texts concatenated, ``count`` summed), so a
  slow consumer receives fewer, larger pieces but every character, in order. Other events are
  never dropped or merged (at most a few per turn).
* ``overflow="error"``: the consumer gets :class:`~rxruntime.errors.StreamOverflowError` once the
  waiting events are drained, and the turn is cancelled.

An anyio memory object stream cannot merge items already queued and cannot be fed from a foreign
thread without blocking it, hence this small deque with a loop-safe wake-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import deque
from collections.abc import Callable
from typing import Literal

import anyio

from rxruntime.errors import StreamOverflowError
from rxruntime.events import Event, Token

OverflowPolicy = Literal["coalesce", "error"]


class _Done:
    pass


DONE = _Done()


class Waker:
    """Lets a foreign thread wake a task of the current event loop without blocking."""

    def __init__(self) -> None:
        import asyncio

        self._event = anyio.Event()
        self._call_soon: Callable[[Callable[[], None]], object]
        try:
            self._call_soon = asyncio.get_running_loop().call_soon_threadsafe
        except RuntimeError:  # not asyncio: trio (anyio's other backend)
            import trio  # type: ignore[import-not-found]

            self._call_soon = trio.lowlevel.current_trio_token().run_sync_soon

    def arm(self) -> anyio.Event:
        """A fresh event to wait on; arm *before* checking for work, so no wake-up is lost."""
        self._event = anyio.Event()
        return self._event

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._call_soon(lambda: self._event.set())


class EventBuffer:
    def __init__(self, size: int, overflow: OverflowPolicy, waker: Waker, on_overflow: Callable[[], None]) -> None:
        if size < 1:
            raise ValueError(f"buffer size must be >= 1, got {size}")
        if overflow not in ("coalesce", "error"):
            raise ValueError(f"overflow must be 'coalesce' or 'error', got {overflow!r}")
        self._items: deque[Event | BaseException | _Done] = deque()
        self._lock = threading.Lock()
        self._size = size
        self._overflow = overflow
        self._waker = waker
        self._on_overflow = on_overflow
        self._stopped = False
        self.merged = 0  # how many tokens were merged into others (for diagnostics)

    def on_next(self, event: Event) -> None:
        overflowed = False
        with self._lock:
            if self._stopped:
                return
            tokens = sum(1 for i in self._items if isinstance(i, Token))
            if isinstance(event, Token) and tokens >= self._size:
                last = self._items[-1] if self._items else None
                if self._overflow == "coalesce" and isinstance(last, Token) and last.turn == event.turn:
                    self._items[-1] = dataclasses.replace(
                        event, text=last.text + event.text, count=last.count + event.count
                    )
                    self.merged += event.count
                elif self._overflow == "error":
                    self._items.append(StreamOverflowError(f"the consumer fell {self._size} tokens behind"))
                    self._stopped = overflowed = True
                else:
                    self._items.append(event)
            else:
                self._items.append(event)
        self._waker.wake()
        if overflowed:
            self._on_overflow()

    def on_error(self, exc: Exception) -> None:
        self._finish(exc)

    def on_completed(self) -> None:
        self._finish(DONE)

    def _finish(self, item: BaseException | _Done) -> None:
        with self._lock:
            if self._stopped:
                return
            self._items.append(item)
            self._stopped = True
        self._waker.wake()

    def pop(self) -> Event | BaseException | _Done | None:
        """The oldest waiting item, or None when nothing is waiting."""
        with self._lock:
            return self._items.popleft() if self._items else None
