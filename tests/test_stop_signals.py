"""``rxrt serve`` must stop on Ctrl-C even when the kernel hands the signal to a worker thread.

CI once saw a server ignore SIGINT for a minute: the signal went to one of its threads, and a main
thread parked in ``Event.wait()`` never woke to run the handler. Here a worker thread sends the
signal to itself, which is exactly that delivery.
"""

from __future__ import annotations

import signal
import threading
import time

from rxruntime.commands.stop_signals import StopSignals


def test_a_signal_taken_by_a_worker_thread_still_wakes_the_main_thread() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    order: list[str] = []
    try:
        stop = StopSignals(signals=(signal.SIGUSR1,))
        guard_fired = threading.Event()

        def worker() -> None:
            time.sleep(0.5)  # let the main thread park in wait() first
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

        def guard() -> None:  # ends a wait that would otherwise hang forever, and says so
            if not stop.is_set():
                order.append("guard")
                guard_fired.set()
                stop._stop.set()

        timer = threading.Timer(20.0, guard)
        timer.start()
        threading.Thread(target=worker).start()
        stop.wait()
        order.append("woke")
        timer.cancel()
        assert order == ["woke"], "the main thread slept through a signal a worker thread received"
        assert not guard_fired.is_set()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_to_the_main_thread_sets_it() -> None:
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        stop = StopSignals(signals=(signal.SIGUSR2,))
        assert not stop.is_set()
        signal.raise_signal(signal.SIGUSR2)
        assert stop.is_set()
        stop.wait()  # returns at once
    finally:
        signal.signal(signal.SIGUSR2, previous)
