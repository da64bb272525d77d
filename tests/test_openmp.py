"""models/openmp.py: a thread hands its OpenMP team back, and ``serial`` makes none.

Seen through the process's OS threads (a team's workers are threads Python does not know of):
a thread that runs a parallel torch op gains workers, and loses them when it releases them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from rxruntime.models import openmp

_RUNTIME = openmp.runtime_path()
pytestmark = pytest.mark.skipif(
    _RUNTIME is None or not _RUNTIME.name.startswith("libgomp") or (os.cpu_count() or 1) < 2,
    reason="needs torch's bundled libgomp (its Linux wheels) and 2 CPUs",
)

T = TypeVar("T")


def os_threads() -> int:
    """The process's OS threads, once the count holds still for 50 ms (the workers of an earlier
    test's thread exit after it did)."""
    count, since, deadline = len(os.listdir("/proc/self/task")), time.monotonic(), time.monotonic() + 5
    while time.monotonic() - since < 0.05 and time.monotonic() < deadline:
        time.sleep(0.005)
        now = len(os.listdir("/proc/self/task"))
        if now != count:
            count, since = now, time.monotonic()
    return count


def on_a_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a fresh thread with two torch threads (so its parallel ops make a team)."""
    out: list[T] = []

    def run() -> None:
        torch.set_num_threads(2)
        out.append(fn())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def parallel_op() -> None:
    x = torch.ones(1 << 20)
    assert float((x * 2.0).sum()) == 2.0 * (1 << 20)  # well over the grain: runs on the team


def test_a_released_thread_gives_its_team_back() -> None:
    def run() -> tuple[int, int, int, bool]:
        before = os_threads()
        parallel_op()
        with_team = os_threads()
        released = openmp.release_idle_threads()
        return before, with_team, os_threads(), released

    before, with_team, after, released = on_a_thread(run)
    assert released
    assert with_team > before  # the op started the thread's team
    assert after < with_team  # and releasing it stopped the workers


def test_serial_runs_the_block_on_the_thread_alone_and_restores_it() -> None:
    def run() -> tuple[int, int, int]:
        before = os_threads()
        with openmp.serial():
            parallel_op()
            inside = os_threads()
        parallel_op()
        return before, inside, os_threads()

    before, inside, after = on_a_thread(run)
    assert inside == before  # no team was started inside the block
    assert after > before  # after it, the thread's parallel ops run on a team again


def test_serial_restores_the_threads_when_the_block_raises() -> None:
    def run() -> tuple[int, int]:
        before = os_threads()
        with pytest.raises(RuntimeError, match="inside"), openmp.serial():
            raise RuntimeError("inside")
        parallel_op()
        return before, os_threads()

    before, after = on_a_thread(run)
    assert after > before


def test_the_engine_gives_back_the_team_of_the_thread_that_built_it(tok: object) -> None:
    from rxruntime import Engine
    from rxruntime.models import RxTModel

    from .conftest import tiny_config

    def run() -> tuple[int, int]:
        model = RxTModel(tiny_config(vocab_size=300, max_seq_len=48)).eval()
        parallel_op()  # as loading a model does
        with_team = os_threads()
        engine = Engine(model, tok)  # type: ignore[arg-type]
        try:
            # the engine's own threads started (decode, memory, delivery ones start on demand);
            # the builder's team workers are gone, so fewer threads than with_team + 2
            return with_team, os_threads()
        finally:
            engine.close()

    with_team, after = on_a_thread(run)
    assert after < with_team + 2


def test_the_engines_api_runs_its_tensor_work_on_the_callers_thread_alone(tok: object) -> None:
    """A new conversation's random STM is made with the caller's OpenMP threads set to 1
    (``openmp.serial``), and the thread's setting is back afterwards."""
    import ctypes

    from rxruntime import Engine
    from rxruntime.models import RxTModel

    from .conftest import tiny_config

    max_threads = openmp._function("omp_get_max_threads", ctypes.c_int)
    engine = Engine(RxTModel(tiny_config()).eval(), tok)  # type: ignore[arg-type]
    seen: list[int] = []
    real = engine._random_stm

    def random_stm(seed: int) -> torch.Tensor:
        seen.append(max_threads())
        return real(seed)

    engine._random_stm = random_stm  # type: ignore[method-assign]
    try:

        def run() -> int:
            engine.conversation("c1")
            return int(max_threads())

        after = on_a_thread(run)
    finally:
        engine.close()
    assert seen == [1]
    assert after == 2
