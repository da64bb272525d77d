"""Admission and ordering: which queued turn may start, and in what order, for every conversation.

One lock (``Scheduler.lock``, a Condition) guards every conversation's state; the decode loop,
the memory worker and the engine's API take it for short, non-blocking sections only.

* **Order.** A conversation's turns run in turn-number order, however their callers race: a
  turn number is reserved (``reserve_turn``) when the query enters the conversation, and a
  queued turn is admitted only when no turn with a smaller number is still reserved but not
  queued. A reservation whose turn will never start is released (``release_turn``).
* **One at a time.** A turn is admitted only when its conversation is idle: the previous turn's
  memory update has committed (on a GPU: has been enqueued on the memory stream).
* **Bounds.** ``max_queued_turns`` over the engine and ``max_turns_per_conversation`` per
  conversation (reserved turns included) are checked before a turn number is taken, so a
  refused query uses none (:class:`~rxruntime.errors.QueueFullError`).
* **Together.** While a caller holds admission (``hold``/``unhold``: ``Engine.together()``),
  no queued turn starts, so the turns sent meanwhile join the decode batch in one prefill (as a
  batch API's would: the weights are read once for all of them, and a burst is not split into
  a small join and a large one). A hold lasts ``max_wait`` seconds at most: a caller that waits
  on its own held turn is late, never stuck.
* **Residency.** With a store, at most ``max_resident`` conversations and ``max_resident_bytes``
  bytes of STMs stay in memory; the least recently used idle ones are evicted and re-read from
  the store when next used.

The books it keeps are here too, plain data shared by the engine's rooms: a
:class:`ConversationEntry` per conversation, a :class:`Job` per queued turn (the decode loop runs
them), a :class:`MemoryTask` per memory update (the memory worker runs them), and a
:class:`MemoryRecord` per turn's memory stage, so a watcher that arrives late still hears what
happened (:func:`settle`, :func:`post_record`). Callbacks are posted to the conversation's
:class:`~rxruntime.events.Mailbox`, never run under the lock.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from rxruntime.backend import MemoryListener, TurnListener, TurnRequest
from rxruntime.errors import ConversationError, EngineClosedError, QueueFullError
from rxruntime.events import Mailbox

RECORDS_KEPT = 64  # memory records kept per conversation, for late watchers


@dataclass(eq=False)  # identity: found and removed in queues by who it is
class Job:
    """One queued turn: a decode turn, or a memory-only one (``memory_ids``: ``memorize``)."""

    request: TurnRequest
    listener: TurnListener
    conv: ConversationEntry
    seed: int
    submitted: float
    limit: int
    order: float = 0.0  # position among the conversation's turns (its turn number; see Scheduler)
    admitted: float = 0.0
    first_token: float | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    phase: str = "waiting"  # waiting -> active -> done
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
    conv: ConversationEntry
    turn: int
    ids: list[int] | None = None  # the interaction the encoder reads
    install: Install | None = None


@dataclass
class MemoryRecord:
    status: str  # queued, started, updated, failed, skipped
    version: int
    duration: float = 0.0
    error: Exception | None = None
    change: tuple[float, ...] = ()  # per layer: |STM_t - STM_t-1| / |STM_t-1|
    gate: tuple[float, ...] = ()  # per layer: the residual gates' mean share of the update


@dataclass(eq=False)
class ConversationEntry:
    """The engine's entry for one conversation: its STM on the device, its counters, its queue,
    who listens to its memory stage. (Not a snapshot: that is :class:`~rxruntime.snapshot.ConversationState`.)"""

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
    # the memory cross-attention keys/values of ``stm``, made by the memory update that made it
    # (per memory layer, (kv_heads, slots, head_dim) each): the next turn's join takes them instead
    # of projecting the STM itself; None when ``stm`` came another way (cleared with every change)
    memory_kv: list[tuple[Tensor, Tensor]] | None = None
    records: dict[int, MemoryRecord] = field(default_factory=dict)
    watchers: dict[int, list[MemoryListener]] = field(default_factory=dict)
    subscribers: list[MemoryListener] = field(default_factory=list)
    history: deque[dict[str, float | int | str]] = field(default_factory=lambda: deque(maxlen=1000))
    memory_error: Exception | None = None  # of the last memory update, None once one succeeds

    @property
    def idle(self) -> bool:
        return not self.busy and not self.pending and not self.reserved


def resident_size(conv: ConversationEntry) -> int:
    """Bytes a resident conversation holds: its STM and the memory keys/values made with it."""
    tensors = [] if conv.stm is None else [conv.stm]
    tensors += [t for pair in conv.memory_kv or () for t in pair]
    return sum(t.nelement() * t.element_size() for t in tensors)


class Scheduler:
    def __init__(
        self,
        *,
        max_queued_turns: int,
        max_turns_per_conversation: int,
        max_resident: int | None,
        max_resident_bytes: int | None = None,
    ) -> None:
        self.lock = threading.Condition()
        self.conversations: dict[str, ConversationEntry] = {}
        self.waiting: deque[Job] = deque()
        self.closed = False
        self.max_queued_turns = max_queued_turns
        self.max_turns_per_conversation = max_turns_per_conversation
        self.max_resident = max_resident
        self.max_resident_bytes = max_resident_bytes
        self._resident: OrderedDict[str, int] = OrderedDict()  # id -> STM bytes, least recently used first
        self._resident_bytes = 0
        self._reserved_total = 0
        self.busy_count = 0  # conversations with a turn or memory update under way
        self._holds: dict[object, float] = {}  # admission holds (Engine.together): their deadlines

    # ------------------------------------------------------------------ conversations
    def get(self, conversation_id: str) -> ConversationEntry:
        """An open conversation (under the lock)."""
        conv = self.conversations.get(conversation_id)
        if conv is None or not conv.open:
            raise ConversationError(f"unknown conversation {conversation_id!r}")
        return conv

    def check_open(self) -> None:
        if self.closed:
            raise EngineClosedError("the engine is closed")

    def forget_if_done(self, conv: ConversationEntry) -> None:
        """Drop a closed conversation once nothing of it is left to run."""
        if not conv.open and not conv.busy and not conv.pending and self.conversations.get(conv.id) is conv:
            del self.conversations[conv.id]
            self._drop_resident(conv.id)

    # ------------------------------------------------------------------ turn numbers
    def check_room(self, conv: ConversationEntry, n: int) -> None:
        queued = len(self.waiting) + self._reserved_total
        if queued + n > self.max_queued_turns:
            raise QueueFullError(f"the engine has {queued} turns queued (max_queued_turns={self.max_queued_turns})")
        mine = len(conv.pending) + len(conv.reserved)
        if mine + n > self.max_turns_per_conversation:
            raise QueueFullError(
                f"conversation {conv.id!r} has {mine} turns queued "
                f"(max_turns_per_conversation={self.max_turns_per_conversation})"
            )

    def number_turn(self, conv: ConversationEntry) -> int:
        """The conversation's next turn number, for a turn submitted at once (``memorize``).

        The scheduler alone hands out turn numbers; they order a conversation's turns."""
        turn = conv.next_turn
        conv.next_turn += 1
        return turn

    def reserve_turn(self, conv: ConversationEntry) -> int:
        """The next turn number, held until its turn is submitted or released (a query's turn)."""
        self.check_open()
        self.check_room(conv, 1)
        turn = self.number_turn(conv)
        conv.reserved.add(turn)
        self._reserved_total += 1
        return turn

    def release_turn(self, conv: ConversationEntry, turn: int) -> None:
        """A reserved turn that will never start no longer holds back the turns after it."""
        if turn in conv.reserved:
            conv.reserved.discard(turn)
            self._reserved_total -= 1
            self.lock.notify_all()
            self.forget_if_done(conv)

    def unreserve(self, conv: ConversationEntry, turn: int) -> None:
        """A turn refused at start: give its number back if no later one was taken."""
        self.release_turn(conv, turn)
        if conv.next_turn == turn + 1:
            conv.next_turn = turn

    # ------------------------------------------------------------------ queueing and admission
    def submit(self, job: Job) -> None:
        """Queue a job among its conversation's turns, by ``job.order``."""
        conv = job.conv
        if job.request.turn in conv.reserved:
            conv.reserved.discard(job.request.turn)
            self._reserved_total -= 1
        orders = [j.order for j in conv.pending]
        conv.pending.insert(bisect.bisect_right(orders, job.order), job)
        self.waiting.append(job)
        self.touch(conv)
        self.lock.notify_all()

    def _ready(self, job: Job) -> bool:
        conv = job.conv
        if conv.busy or not conv.pending or conv.pending[0] is not job:
            return False
        return not conv.reserved or min(conv.reserved) > job.order

    def hold(self, max_wait: float) -> object:
        """Start no queued turn until :meth:`unhold` of what this returns, or for ``max_wait``
        seconds at most; while several holds are on, until the last lapses or ends. Under the lock."""
        token = object()
        self._holds[token] = time.monotonic() + max_wait
        return token

    def unhold(self, token: object) -> None:
        """End the hold :meth:`hold` returned ``token`` for, and wake the decode loop. Under the lock."""
        del self._holds[token]
        self.lock.notify_all()

    def held_for(self) -> float | None:
        """Seconds admission stays held at most (the latest deadline of the holds on); None when
        it is not held."""
        if not self._holds:
            return None
        left = max(self._holds.values()) - time.monotonic()
        return left if left > 0 else None

    def admissible(self) -> bool:
        return self.held_for() is None and any(self._ready(job) for job in self.waiting)

    def admit(self, room: int) -> tuple[list[Job], list[Job]]:
        """Jobs that may start now, FIFO: up to ``room`` decode turns, and every memory-only or
        install job (they take no decode row); none while admission is held. Each admitted
        job's conversation becomes busy."""
        decode: list[Job] = []
        memory: list[Job] = []
        if self.held_for() is not None:
            return decode, memory
        for job in list(self.waiting):
            if not self._ready(job):
                continue
            if job.memory_ids is None and job.install is None:
                if len(decode) >= room:
                    continue
                decode.append(job)
            else:
                memory.append(job)
            self.waiting.remove(job)
            job.conv.pending.popleft()
            if not job.conv.busy:
                self.busy_count += 1
            job.conv.busy = True
            job.phase = "active" if job in decode else "done"
        return decode, memory

    def drop_waiting(self, job: Job, exc: Exception | None = None) -> None:
        if job in self.waiting:
            self.waiting.remove(job)
        if job in job.conv.pending:
            job.conv.pending.remove(job)
        job.phase = "done"
        if exc is not None:
            listener = job.listener
            job.conv.mailbox.post(lambda v=job.conv.version: listener.on_error(exc, v))  # type: ignore[misc]
        self.lock.notify_all()
        self.forget_if_done(job.conv)

    def fail_waiting(self, exc: Exception) -> None:
        for job in list(self.waiting):
            self.drop_waiting(job, exc)

    def mark_idle(self, conv: ConversationEntry) -> None:
        """The conversation's running turn or memory update is over: its next turn may start."""
        if conv.busy:
            self.busy_count -= 1
        conv.busy = False
        self.lock.notify_all()
        self.forget_if_done(conv)

    # ------------------------------------------------------------------ residency (LRU)
    def touch(self, conv: ConversationEntry) -> None:
        if conv.stm is not None:
            self._drop_resident(conv.id)
            self._resident[conv.id] = size = resident_size(conv)
            self._resident_bytes += size

    def _drop_resident(self, conversation_id: str) -> None:
        self._resident_bytes -= self._resident.pop(conversation_id, 0)

    def _over(self, count: int, size: int) -> bool:
        return (self.max_resident is not None and count > self.max_resident) or (
            self.max_resident_bytes is not None and size > self.max_resident_bytes
        )

    def evictable(self) -> list[ConversationEntry]:
        """Idle open conversations beyond ``max_resident`` or ``max_resident_bytes``, least
        recently used first (busy ones stay, even over the budget)."""
        count, size = len(self._resident), self._resident_bytes
        victims: list[ConversationEntry] = []
        for cid in list(self._resident):
            if not self._over(count, size):
                break
            conv = self.conversations.get(cid)
            if conv is None or conv.stm is None:
                stale = self._resident[cid]
                self._drop_resident(cid)
                count, size = count - 1, size - stale
            elif conv.open and conv.idle:
                victims.append(conv)
                count, size = count - 1, size - self._resident[cid]
        for conv in victims:
            self._drop_resident(conv.id)
        return victims

    @property
    def resident(self) -> int:
        return len(self._resident)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the STMs held in memory (the conversations not evicted)."""
        return self._resident_bytes


# ---------------------------------------------------------------------- memory records (under the lock)
def set_record(conv: ConversationEntry, turn: int, record: MemoryRecord) -> None:
    conv.records[turn] = record
    if len(conv.records) > RECORDS_KEPT:
        del conv.records[min(conv.records)]
    if record.status == "skipped":
        post_record(conv, turn, record, take_watchers(conv, turn))


def take_watchers(conv: ConversationEntry, turn: int) -> list[MemoryListener]:
    return conv.watchers.pop(turn, [])


def notify_started(conv: ConversationEntry, turn: int) -> None:
    listeners = [*conv.watchers.get(turn, []), *conv.subscribers] if turn > 0 else list(conv.subscribers)
    version = conv.version
    for listener in listeners:
        conv.mailbox.post(lambda ls=listener: ls.on_memory_started(turn, version))  # type: ignore[misc]


def post_record(
    conv: ConversationEntry, turn: int, record: MemoryRecord, watchers: list[MemoryListener], replay: bool = False
) -> None:
    listeners = watchers if replay else [*watchers, *conv.subscribers]
    for listener in listeners:
        if record.status == "updated":
            if replay:
                conv.mailbox.post(lambda ls=listener: ls.on_memory_started(turn, record.version - 1))  # type: ignore[misc]
            conv.mailbox.post(
                lambda ls=listener: ls.on_memory_updated(  # type: ignore[misc]
                    turn, record.version, record.duration, record.change, record.gate
                )
            )
        elif record.status == "failed":
            assert record.error is not None
            error = record.error
            conv.mailbox.post(lambda ls=listener, e=error: ls.on_memory_failed(turn, e, record.version))  # type: ignore[misc]
        elif record.status == "skipped" and listener in watchers:
            conv.mailbox.post(lambda ls=listener: ls.on_memory_skipped(turn))  # type: ignore[misc]


def settle(conv: ConversationEntry, turn: int, record: MemoryRecord) -> None:
    """Record a finished memory stage and tell its watchers and the subscribers."""
    set_record(conv, turn, record)
    post_record(conv, turn, record, take_watchers(conv, turn))
