"""The engine: one per model. It owns the device and runs every conversation's turns.

Its rooms, each behind a narrow interface (as vLLM's v1 engine separates its scheduler, executor
and output processing):

* :mod:`~rxruntime.engine.core` - :class:`Engine`, the public API: checks requests at the door,
  implements the :class:`~rxruntime.backend.Backend` the operators talk to, and manages
  conversations' lifecycle (open, resume, close, delete, reset, restore, eviction, reload);
* :mod:`~rxruntime.engine.scheduler` - admission and ordering: per-conversation turn numbers and
  order, one turn at a time per conversation, queue bounds, which STMs stay resident; and the
  books the rooms share (one :class:`~rxruntime.engine.scheduler.ConversationEntry` per
  conversation, queued jobs, memory records);
* :mod:`~rxruntime.engine.decode_loop` - the decode thread: continuous batching, one failing
  row failing only its own turn;
* :mod:`~rxruntime.engine.memory_worker` - the memory thread (a CUDA stream on a GPU): encoder +
  memory attention, and every commit of a new STM, persisted (:mod:`rxruntime.stores`) before it
  becomes visible.

Options are checked in :mod:`rxruntime.options`; the operator-facing contract is
:mod:`rxruntime.backend`.
"""

from __future__ import annotations

import warnings
from typing import Any

from rxruntime import backend as _backend
from rxruntime import options as _options

from .core import Engine

# Names this package used to export, and their homes now (old imports work, with a warning).
_MOVED = {
    "AnswerStats": _backend,
    "Backend": _backend,
    "MemoryListener": _backend,
    "TurnListener": _backend,
    "TurnRequest": _backend,
    "TurnOptions": _options,
    "check_options": _options,
}


def __getattr__(name: str) -> Any:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"rxruntime.engine.{name} moved to {home.__name__}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(home, name)


__all__ = ["Engine"]
