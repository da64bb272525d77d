"""The engine's records of conversations, queued turns and memory work (guarded by the scheduler's lock).

These are plain data shared by the engine's rooms: the scheduler orders and admits :class:`Job`s,
the decode loop runs them, the memory worker runs :class:`MemoryTask`s and commits STMs.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from rxruntime.mailbox import Mailbox

from .protocol import MemoryListener, TurnListener, TurnRequest

RECORDS_KEPT = 64  # memory records kept per conversation, for late watchers


@dataclass(eq=False)  # identity: found and removed in queues by who it is
class Job:
    """One queued turn: a decode turn, or a memory-only one (``memory_ids``: ``memorize``)."""

    request: TurnRequest
    listener: TurnListener
    conv: ConvState
    seed: int
    submitted: float
    limit: int
    order: float = 0.0  # position among the conversation's turns (its turn number; see Scheduler)
    admitted: float = 0.0
    first_token: float | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    state: str = "waiting"  # waiting -> active -> done
    memory_ids: list[int] | None = None
    install: Install | None = None  # a control job: replace the STM (reset / load_state)


@dataclass(eq=False)
class Install:
    """A new STM to commit as it is (no model call): ``reset`` and ``load_state``.

    ``version``: the version to commit, or None for the conversation's version + 1 (either way
    moved past the store's if the store holds a newer one: an install is an explicit overwrite).
    """

    stm: Tensor
    version: int | None = None
    turns: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None  # set when it could not be committed


@dataclass(eq=False)
class MemoryTask:
    conv: ConvState
    turn: int
    ids: list[int] | None = None  # the interaction the encoder reads
    install: Install | None = None


@dataclass
class MemoryRecord:
    status: str  # queued, started, updated, failed, skipped
    version: int
    duration: float = 0.0
    error: Exception | None = None


@dataclass(eq=False)
class ConvState:
    """One conversation inside the engine."""

    id: str
    stm: Tensor | None  # (L, S, D) on the engine's device; None while evicted (the store holds it)
    mailbox: Mailbox
    seed: int = 0  # of the random initial STM, reused by reset() and by resuming an evicted one
    version: int = 0
    next_turn: int = 1
    committed_turn: int = 0  # the last turn whose memory update committed (what the store records)
    busy: bool = False  # a turn is decoding or a memory update of this conversation is pending
    open: bool = True  # False once closed: kept only until its owed memory work is done
    pending: deque[Job] = field(default_factory=deque)  # sorted by Job.order
    reserved: set[int] = field(default_factory=set)  # turn numbers reserved, not yet started
    ready_event: Any = None  # torch.cuda.Event after the last memory update (GPU only)
    records: dict[int, MemoryRecord] = field(default_factory=dict)
    watchers: dict[int, list[MemoryListener]] = field(default_factory=dict)
    subscribers: list[MemoryListener] = field(default_factory=list)
    history: deque[dict[str, float | int | str]] = field(default_factory=lambda: deque(maxlen=1000))
    memory_error: Exception | None = None  # of the last memory update, None once one succeeds

    @property
    def idle(self) -> bool:
        return not self.busy and not self.pending and not self.reserved
