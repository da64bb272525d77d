"""The engine: one per model. It owns the device and runs every conversation's turns.

Its rooms, each behind a narrow interface (as vLLM's v1 engine separates its scheduler, executor
and output processing):

* :mod:`~rxruntime.engine.core` - :class:`Engine`, the public API: checks requests at the door
  and manages conversations' lifecycle (open, close, delete, reset, restore, eviction);
* :mod:`~rxruntime.engine.scheduler` - admission and ordering: per-conversation turn order,
  one turn at a time per conversation, queue bounds, which STMs stay resident;
* :mod:`~rxruntime.engine.decode_loop` - the decode thread: continuous batching, one failing
  row failing only its own turn;
* :mod:`~rxruntime.engine.memory_worker` - the memory thread (a CUDA stream on a GPU): encoder +
  memory attention, and every commit of a new STM, persisted before it becomes visible;
* :mod:`~rxruntime.engine.options` - checking option values and token ids;
* :mod:`~rxruntime.engine.protocol` - what operators ask of an engine (:class:`Backend`);
* :mod:`~rxruntime.engine.state` and :mod:`~rxruntime.engine.records` - the shared records.
"""

from rxruntime.engine.core import Engine
from rxruntime.engine.options import TurnOptions, check_options
from rxruntime.engine.protocol import AnswerStats, Backend, MemoryListener, TurnListener, TurnRequest

__all__ = [
    "AnswerStats",
    "Backend",
    "Engine",
    "MemoryListener",
    "TurnListener",
    "TurnOptions",
    "TurnRequest",
    "check_options",
]
