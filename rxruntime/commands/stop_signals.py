"""Wait for Ctrl-C / SIGTERM in a process full of threads.

A process-directed signal goes to *any* thread that does not block it. When a worker thread
(the engine, the zmq authenticator, torch's pool) takes it, CPython's handler only flags it for
the main thread, and a main thread parked in ``Event.wait()`` with no timeout never wakes to run
it: the server ignores Ctrl-C. Polling with a short timeout lets the main thread run the pending
handler within ``poll_s``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable


class StopSignals:
    """Set once any of ``signals`` arrives; install it in the main thread before serving anyone."""

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self._stop = threading.Event()
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self._stop.set()

    def is_set(self) -> bool:
        return self._stop.is_set()

    def wait(self, poll_s: float = 0.2) -> None:
        """Block until a signal has arrived, whichever thread the kernel delivered it to."""
        while not self._stop.wait(poll_s):
            pass
