"""Torch's OpenMP runtime, and handing an idle thread's OpenMP workers back.

Every thread that runs a parallel torch op becomes the master of its own OpenMP team, whose
workers stay parked after the op. libgomp counts all of them, and once a process holds more
OpenMP threads than it has CPUs it stops letting a team's workers spin between parallel
regions: each region then wakes them from a futex. An engine holds at least three masters (the
thread that loaded the model, the decode loop, the memory worker), so on a 2-CPU machine every
torch op on the engine's threads paid that wake-up: 3,000 small element-wise ops took 0.488 s on
a thread against 0.113 s on the main thread, and a 16-prompt float32 prefill 0.571 s against
0.397 s (AMD EPYC Zen 3, 2 vCPUs; ``benchmarks/openmp_threads.py``, docs/benchmarks.md §7).

:func:`release_idle_threads` returns the calling thread's team to the runtime (OpenMP 5.0's
``omp_pause_resource_all``), so only the threads at work hold teams and the ones at work keep
spinning. A released thread that runs a parallel op again gets a fresh team (a thread start,
tens of microseconds), so the engine releases a thread only as it goes idle. :func:`serial` keeps
a caller's thread from making a team at all while it runs the engine's small tensor work (a new
conversation's random STM, checks of a given one): one thread does that in about a millisecond.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
"""``omp_pause_soft``: the threads are returned; the runtime stays usable."""


@functools.cache
def runtime_path() -> Path | None:
    """The OpenMP runtime bundled with torch, if any (the C step links it, so both share one
    set of threads). Looked up once: the engine's threads ask at every idle moment."""
    lib = Path(torch.__file__).parent / "lib"
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        if (lib / name).exists():
            return lib / name
    return None


@functools.cache
def _function(name: str, restype: type | None, *argtypes: type) -> Any:
    """``name`` from torch's OpenMP runtime, or None where there is none."""
    path = runtime_path()
    if path is None:
        return None
    try:
        fn = getattr(ctypes.CDLL(str(path)), name)
    except (OSError, AttributeError) as exc:  # an older runtime: go without
        log.debug("OpenMP runtime %s has no %s: %s", path, name, exc)
        return None
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


def release_idle_threads() -> bool:
    """Return the calling thread's OpenMP workers to torch's runtime; True if it took them.
    Call it only outside parallel regions, as a thread goes idle. Only GNU libgomp (torch's
    Linux wheels) is asked: its pause releases the caller's own team, where LLVM's and Intel's
    runtimes act on the whole process; elsewhere (no bundled runtime, as on macOS) a
    no-op."""
    path = runtime_path()
    if path is None or not path.name.startswith("libgomp"):  # the throttling and the pause are libgomp's
        return False
    fn = _function("omp_pause_resource_all", ctypes.c_int, ctypes.c_int)
    return fn is not None and fn(OMP_PAUSE_SOFT) == 0


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Run the block's torch ops on the calling thread alone (its OpenMP threads set to 1, then
    restored), so a thread outside the engine gets no OpenMP team from the engine's small work;
    also a decorator."""
    get = _function("omp_get_max_threads", ctypes.c_int)
    put = _function("omp_set_num_threads", None, ctypes.c_int)
    if get is None or put is None:
        yield
        return
    torch.get_num_threads()  # torch sets a thread's OpenMP threads on its first use: do it before
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)
