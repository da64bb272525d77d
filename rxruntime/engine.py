"""The engine: one per model. It owns the device and runs every conversation's turns.

Two threads do the work:

* the **decode thread** runs continuous batching: turns join the decode batch (a batched prefill)
  and leave it (on ``[EOS]``, the length limit, or cancellation) between decode steps, each row
  reading its own conversation's STM through memory cross-attention;
* the **memory thread** runs the asynchronous half of every turn: encoder + memory attention over
  ``[BOS][Q] query [A] answer [EOS]``, batched across conversations, then commits STM(t) (version
  + 1). On a GPU it runs on its own CUDA stream and the next decode of that conversation waits on
  a CUDA event instead of the host.

Ordering per conversation: a turn is admitted to the decode batch only when the conversation is
idle, i.e. the previous turn's memory update has committed (on a GPU: has been enqueued on the
memory stream). A query sent during a memory update therefore waits, and the STM is never read
half-written; other conversations are not blocked. Once an answer completes, its memory update
always runs, whether or not anyone still listens, so a turn is never silently dropped.

The engine never calls user code on its threads: listener callbacks go through each
conversation's :class:`~rxruntime.mailbox.Mailbox`. Operators (``rxruntime.operators``) turn
those callbacks into events; :class:`~rxruntime.conversation.Conversation` is the user-facing
handle.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from rxruntime.errors import (
    ConversationError,
    EngineClosedError,
    InvalidOptionError,
    ModelExecutionError,
    QueryTooLongError,
    QueueFullError,
)
from rxruntime.events import FinishReason
from rxruntime.mailbox import Mailbox
from rxruntime.models import native
from rxruntime.models.generation import DecodeBatch, JoinRequest
from rxruntime.models.rxt import RxTModel
from rxruntime.models.sampler import SamplingParams
from rxruntime.models.tokenizer import RxTokenizer

if TYPE_CHECKING:
    from rxruntime.conversation import Conversation, ConversationState
    from rxruntime.stores import STMStore

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the operator-facing protocol
@dataclass(frozen=True)
class TurnRequest:
    """What the ``generate`` operator asks the engine to run."""

    conversation_id: str
    turn: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_new_tokens: int | None = None
    remember_partial: bool = False


@dataclass(frozen=True)
class AnswerStats:
    ttft_s: float
    tokens_per_s: float
    duration_s: float
    queued_s: float


class TurnListener(Protocol):
    """Decode-stage callbacks of one turn, delivered in order on the conversation's mailbox."""

    def on_token(self, token_id: int, position: int) -> None: ...

    def on_answer(self, token_ids: tuple[int, ...], finish_reason: FinishReason, stats: AnswerStats) -> None: ...

    def on_error(self, exc: Exception, stm_version: int) -> None: ...


class MemoryListener(Protocol):
    """Memory-stage callbacks of one turn (or of every turn, for ``memory_events``)."""

    def on_memory_started(self, turn: int, stm_version: int) -> None: ...

    def on_memory_updated(self, turn: int, stm_version: int, duration_s: float) -> None: ...

    def on_memory_failed(self, turn: int, exc: Exception, stm_version: int) -> None: ...

    def on_memory_skipped(self, turn: int) -> None: ...


class Backend(Protocol):
    """What operators need from an engine (a fake one drives the marble tests)."""

    tokenizer: RxTokenizer
    max_seq_len: int
    vocab_size: int
    default_sampling: SamplingParams

    def next_turn(self, conversation_id: str) -> int: ...

    def start_turn(self, request: TurnRequest, listener: TurnListener) -> Callable[[], None]: ...

    def watch_memory(self, conversation_id: str, turn: int, listener: MemoryListener) -> Callable[[], None]: ...

    def stm_version(self, conversation_id: str) -> int: ...


# ---------------------------------------------------------------------- internal state
@dataclass
class _Job:
    request: TurnRequest
    listener: TurnListener
    conv: _Conv
    seed: int
    submitted: float
    limit: int
    admitted: float = 0.0
    first_token: float | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    state: str = "waiting"  # waiting -> active -> done
    memory_ids: list[int] | None = None  # a memory-only turn (``memorize``): no decoding


@dataclass
class _MemoryTask:
    conv: _Conv
    turn: int
    ids: list[int]


@dataclass
class _MemoryRecord:
    status: str  # queued, started, updated, failed, skipped
    version: int
    duration: float = 0.0
    error: Exception | None = None


@dataclass
class _Conv:
    id: str
    stm: Tensor  # (L, S, D) on the engine's device
    mailbox: Mailbox
    seed: int = 0  # of the random initial STM, reused by reset()
    version: int = 0
    next_turn: int = 1
    busy: bool = False  # a turn is decoding or its memory update is pending
    pending: deque[_Job] = field(default_factory=deque)
    ready_event: Any = None  # torch.cuda.Event after the last memory update (GPU only)
    records: dict[int, _MemoryRecord] = field(default_factory=dict)
    watchers: dict[int, list[MemoryListener]] = field(default_factory=dict)
    subscribers: list[MemoryListener] = field(default_factory=list)
    history: deque[dict[str, float | int | str]] = field(default_factory=lambda: deque(maxlen=1000))


_RECORDS_KEPT = 64  # memory records kept per conversation, for late watchers


class Engine:
    """Runs an RxT model for many conversations at once. Use as a context manager or ``close()``."""

    def __init__(
        self,
        model: RxTModel,
        tokenizer: RxTokenizer,
        *,
        max_batch: int = 64,
        default_sampling: SamplingParams | None = None,
        delivery_threads: int = 32,
        store: STMStore | None = None,
        max_queued_turns: int = 4096,
        max_turns_per_conversation: int = 64,
        max_memory_backlog: int = 1024,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_seq_len = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        self.default_sampling = default_sampling or SamplingParams(temperature=0.0)
        self.device = model.device
        self.store = store
        self.max_queued_turns = max_queued_turns
        self.max_turns_per_conversation = max_turns_per_conversation
        self.max_memory_backlog = max_memory_backlog
        self._cuda = self.device.type == "cuda"
        self._lock = threading.Condition()
        self._conversations: dict[str, _Conv] = {}
        self._waiting: deque[_Job] = deque()
        self._jobs: dict[int, _Job] = {}  # decode-batch key -> job
        self._memory_queue: deque[_MemoryTask] = deque()
        self._memory_cv = threading.Condition()
        self._closed = False
        self._batch = DecodeBatch(model, capacity=max_batch)
        if self.device.type == "cpu" and model.native_decode:
            native.enabled()  # build the C decode step now (once per machine), not in the first turn
        self._delivery = ThreadPoolExecutor(delivery_threads, thread_name_prefix="rxrt-deliver")
        self._memory_stream = torch.cuda.Stream(self.device) if self._cuda else None  # type: ignore[no-untyped-call]
        self._decode_thread = threading.Thread(target=self._decode_loop, name="rxrt-decode", daemon=True)
        self._memory_thread = threading.Thread(target=self._memory_loop, name="rxrt-memory", daemon=True)
        self._decode_thread.start()
        self._memory_thread.start()

    # ------------------------------------------------------------------ conversations
    def conversation(
        self,
        conversation_id: str | None = None,
        *,
        memory_init: str | None = None,
        state: ConversationState | None = None,
        seed: int | None = None,
        stm: Tensor | None = None,
    ) -> Conversation:
        """Open a conversation: a fresh random STM, one pre-read from ``memory_init`` (a system
        text, written to memory in the background before the first turn), a saved ``state``, or
        a given ``stm`` tensor of shape (layers, slots, dim) (e.g. RxLM's exported STM without
        its batch axis), checked for shape, dtype and finite values.

        With a store, an id the store knows resumes from its stored memory (``memory_init`` is
        then ignored)."""
        from rxruntime.conversation import Conversation

        if sum(x is not None for x in (memory_init, state, stm)) > 1:
            raise ConversationError("pass at most one of memory_init, state and stm")
        if state is not None:
            state.check_fits(self.config)
            conversation_id = conversation_id or state.conversation_id
        given_stm = None if stm is None else self._check_stm(stm)
        conversation_id = conversation_id or _new_id()
        if state is None and given_stm is None and self.store is not None:
            state = self.store.get(conversation_id)  # a stored conversation resumes where it was
            if state is not None:
                state.check_fits(self.config)
                memory_init = None
        stm_seed = seed if seed is not None else zlib.crc32(conversation_id.encode())
        if state is not None:
            stm = state.stm.to(self.device, self.model.dtype)
        elif given_stm is not None:
            stm = given_stm
        else:
            gen = torch.Generator().manual_seed(stm_seed)
            stm = self.model.init_stm(1, gen)[0].to(self.device)
        conv = _Conv(id=conversation_id, stm=stm, mailbox=Mailbox(self._delivery), seed=stm_seed)
        if state is not None:
            conv.version, conv.next_turn = state.stm_version, state.turn + 1
        with self._lock:
            self._check_open()
            if conversation_id in self._conversations:
                raise ConversationError(f"conversation {conversation_id!r} already exists in this engine")
            if memory_init is not None:
                self._check_memory_backlog()
            self._conversations[conversation_id] = conv
            if memory_init is not None:
                conv.busy = True
                ids = self.tokenizer.interaction_ids(memory_init, "")[: self.max_seq_len]
                self._enqueue_memory(_MemoryTask(conv, 0, ids))
        return Conversation(self, conversation_id)

    def close_conversation(self, conversation_id: str) -> None:
        """Forget a conversation: its queued turns fail with ConversationError, a running one is
        cancelled (a completed answer's memory update still finishes, on memory nobody reads)."""
        with self._lock:
            conv = self._conv(conversation_id)
            closed = ConversationError(f"conversation {conversation_id!r} was closed")
            for job in list(conv.pending):
                self._drop_waiting(job, closed)
            for job in self._jobs.values():
                if job.conv is conv:
                    job.cancelled = True
            del self._conversations[conversation_id]

    def delete_conversation(self, conversation_id: str) -> None:
        """Close a conversation and remove its memory from the store.

        A memory update already running commits first and is then deleted with the rest, so
        nothing is written back afterwards. An id that is not open but is stored is deleted from
        the store; an id known to neither raises ConversationError."""
        with self._lock:
            conv = self._conversations.get(conversation_id)
        if conv is not None:
            self.close_conversation(conversation_id)
            with self._lock:
                while conv.busy and not self._closed:
                    self._lock.wait(0.5)
        elif self.store is None or self.store.get(conversation_id) is None:
            raise ConversationError(f"unknown conversation {conversation_id!r}")
        if self.store is not None:
            self.store.delete(conversation_id)

    @property
    def queue_depth(self) -> int:
        """Turns accepted but not yet started (decode or memory-only), over all conversations."""
        with self._lock:
            return len(self._waiting)

    @property
    def open_conversations(self) -> int:
        """Conversations open in this engine."""
        with self._lock:
            return len(self._conversations)

    def stats(self) -> dict[str, int]:
        """Counters for monitoring (e.g. a /metrics endpoint); a consistent snapshot."""
        with self._lock:
            waiting, active, conversations = len(self._waiting), self._batch.size, len(self._conversations)
        with self._memory_cv:
            backlog = len(self._memory_queue)
        return {
            "queue_depth": waiting,
            "active_turns": active,
            "memory_backlog": backlog,
            "open_conversations": conversations,
            "max_batch": self._batch.capacity,
            "max_queued_turns": self.max_queued_turns,
        }

    def stm_version(self, conversation_id: str) -> int:
        with self._lock:
            return self._conv(conversation_id).version

    def snapshot(self, conversation_id: str) -> tuple[Tensor, int, int]:
        """(STM on the CPU, version, turns so far) of the last committed memory."""
        with self._lock:
            conv = self._conv(conversation_id)
            stm, version, turn = conv.stm, conv.version, conv.next_turn - 1
            event = conv.ready_event
        if event is not None:
            event.synchronize()
        return stm.detach().to("cpu", torch.float32).clone(), version, turn

    def reset(self, conversation_id: str, memory_init: str | None = None, seed: int | None = None) -> None:
        """Give a conversation a fresh STM (after its pending turns)."""
        self.wait_idle(conversation_id)
        with self._lock:
            conv_seed = self._conv(conversation_id).seed
        gen = torch.Generator().manual_seed(seed if seed is not None else conv_seed)
        stm = self.model.init_stm(1, gen)[0].to(self.device)
        with self._lock:
            conv = self._conv(conversation_id)
            version, turns = conv.version + 1, conv.next_turn - 1
        self._persist(conversation_id, turns, stm, version)
        with self._lock:
            conv.stm, conv.ready_event, conv.version = stm, None, version
            if memory_init is not None:
                self._check_memory_backlog()
                conv.busy = True
                ids = self.tokenizer.interaction_ids(memory_init, "")[: self.max_seq_len]
                self._enqueue_memory(_MemoryTask(conv, turns, ids))

    def memorize(
        self, conversation_id: str, interactions: Sequence[tuple[str, str]], timeout: float | None = None
    ) -> int:
        """Write past interactions to memory without decoding (history replay); returns the STM
        version after the last one.

        Each ``(query, answer)`` pair is one turn: it takes the next turn number, runs in order
        with the conversation's other turns, and its encoder + memory attention update commits a
        new STM version like a normal turn's, with MemoryUpdateStarted / MemoryUpdated on
        ``memory_events``. Blocks until the last pair has committed; raises the first failure (the
        pairs after it are not written). Everything is checked before anything is queued."""
        if not isinstance(interactions, Sequence) or isinstance(interactions, str):
            raise InvalidOptionError("interactions", "must be a sequence of (query, answer) string pairs")
        prompts: list[list[int]] = []
        for i, pair in enumerate(interactions):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise InvalidOptionError(f"interactions[{i}]", "must be a (query, answer) pair of strings")
            ids = self.tokenizer.interaction_ids(pair[0], pair[1])
            if len(ids) > self.max_seq_len:
                raise QueryTooLongError(
                    f"interactions[{i}] takes {len(ids)} tokens; an interaction holds at most {self.max_seq_len}"
                )
            prompts.append(ids)
        if not prompts:
            return self.stm_version(conversation_id)
        waiter = _MemorizeWaiter(len(prompts))
        with self._lock:
            self._check_open()
            conv = self._conv(conversation_id)
            self._check_room(conv, len(prompts))
            jobs = []
            for i, ids in enumerate(prompts):
                turn = conv.next_turn
                conv.next_turn += 1
                request = TurnRequest(conversation_id, turn, (), self.default_sampling)
                job = _Job(request, waiter.listener(i), conv, 0, time.perf_counter(), 0, memory_ids=ids)
                conv.watchers.setdefault(turn, []).append(waiter.listener(i))
                conv.pending.append(job)
                self._waiting.append(job)
                jobs.append(job)
            self._lock.notify_all()
        try:
            return waiter.wait(timeout)
        except BaseException:
            with self._lock:  # the pairs not started yet are not written
                for job in jobs:
                    if job.state == "waiting":
                        self._drop_waiting(job)
            raise

    def load_state(self, conversation_id: str, state: ConversationState) -> None:
        """Replace a conversation's STM with a saved snapshot (after its pending turns)."""
        state.check_fits(self.config)
        self.wait_idle(conversation_id)
        stm = state.stm.to(self.device, self.model.dtype)
        with self._lock:
            conv = self._conv(conversation_id)
            version, turns = max(conv.version, state.stm_version) + 1, conv.next_turn - 1
        self._persist(conversation_id, turns, stm, version)
        with self._lock:
            conv.stm, conv.ready_event, conv.version = stm, None, version

    def wait_idle(self, conversation_id: str, timeout: float | None = None) -> bool:
        """Wait until the conversation has no queued turn, no decode and no pending memory update."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            conv = self._conv(conversation_id)
            while conv.busy or conv.pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return conv.mailbox.wait_idle(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def history(self, conversation_id: str) -> list[dict[str, float | int | str]]:
        with self._lock:
            return list(self._conv(conversation_id).history)

    def subscribe_memory(self, conversation_id: str, listener: MemoryListener) -> Callable[[], None]:
        """Listen to the memory events of every turn of a conversation."""
        with self._lock:
            conv = self._conv(conversation_id)
            conv.subscribers.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in conv.subscribers:
                    conv.subscribers.remove(listener)

        return unsubscribe

    # ------------------------------------------------------------------ Backend protocol
    def start_turn(self, request: TurnRequest, listener: TurnListener) -> Callable[[], None]:
        """Queue a turn; returns ``cancel`` (stops it within one decode step if still running)."""
        params = request.params
        limit = self.max_seq_len - len(request.prompt_ids) - 1
        if request.max_new_tokens is not None:
            limit = min(limit, request.max_new_tokens)
        with self._lock:
            conv = self._conv(request.conversation_id)
            if self._closed:
                exc: Exception = EngineClosedError("the engine is closed")
                conv.mailbox.post(lambda v=conv.version: listener.on_error(exc, v))  # type: ignore[misc]
                return lambda: None
            if limit < 1 or len(request.prompt_ids) < 1:
                exc = QueryTooLongError(
                    f"the prompt has {len(request.prompt_ids)} tokens; an interaction holds at most "
                    f"{self.max_seq_len} including the answer and [EOS]"
                )
                conv.mailbox.post(lambda v=conv.version: listener.on_error(exc, v))  # type: ignore[misc]
                return lambda: None
            try:
                self._check_room(conv, 1)
            except QueueFullError as full:
                self._unreserve(conv, request.turn)
                conv.mailbox.post(lambda v=conv.version, e=full: listener.on_error(e, v))  # type: ignore[misc]
                return lambda: None
            job = _Job(request, listener, conv, params.resolved_seed(), time.perf_counter(), limit)
            conv.pending.append(job)
            self._waiting.append(job)
            self._lock.notify_all()

        def cancel() -> None:
            with self._lock:
                if job.state == "waiting":
                    self._drop_waiting(job)
                elif job.state == "active":
                    job.cancelled = True  # the decode thread acts on it at the next step

        return cancel

    def watch_memory(self, conversation_id: str, turn: int, listener: MemoryListener) -> Callable[[], None]:
        """Memory callbacks of one turn; replays what already happened if the watcher is late."""
        with self._lock:
            conv = self._conv(conversation_id)
            record = conv.records.get(turn)
            if record is not None and record.status in ("updated", "failed", "skipped"):
                self._post_record(conv, turn, record, [listener], replay=True)
                return lambda: None
            if record is not None and record.status == "started":
                version = record.version
                conv.mailbox.post(lambda: listener.on_memory_started(turn, version))
            conv.watchers.setdefault(turn, []).append(listener)

        def unwatch() -> None:
            with self._lock:
                if listener in conv.watchers.get(turn, []):
                    conv.watchers[turn].remove(listener)

        return unwatch

    def next_turn(self, conversation_id: str) -> int:
        """Reserve the next turn number of a conversation."""
        with self._lock:
            conv = self._conv(conversation_id)
            turn = conv.next_turn
            conv.next_turn += 1
            return turn

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting turns, fail queued ones, finish memory updates already owed, stop threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        self._decode_thread.join(timeout)
        with self._memory_cv:
            self._memory_cv.notify_all()
        self._memory_thread.join(timeout)
        for conv in list(self._conversations.values()):
            conv.mailbox.wait_idle(timeout)
        self._delivery.shutdown(wait=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ decode thread
    def _decode_loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._closed and self._batch.size == 0 and not self._admissible():
                        self._lock.wait()
                    if self._closed:
                        self._fail_everything(EngineClosedError("the engine was closed"))
                        return
                    joining = self._admit()
                if joining:
                    self._join(joining)
                if self._batch.size:
                    self._step()

    def _admissible(self) -> bool:
        return any(not job.conv.busy and job.conv.pending[0] is job for job in self._waiting)

    def _admit(self) -> list[_Job]:
        """Pick waiting turns whose conversation is idle (FIFO), up to the free batch rows."""
        room = self._batch.capacity - self._batch.size
        chosen: list[_Job] = []
        for job in list(self._waiting):
            conv = job.conv
            if conv.busy or conv.pending[0] is not job:
                continue
            if job.memory_ids is not None:  # memory-only: straight to the memory thread
                self._waiting.remove(job)
                conv.pending.popleft()
                conv.busy = True
                job.state = "done"
                self._enqueue_memory(_MemoryTask(conv, job.request.turn, job.memory_ids))
                continue
            if len(chosen) >= room:
                continue
            self._waiting.remove(job)
            conv.pending.popleft()
            conv.busy = True
            job.state = "active"
            job.admitted = time.perf_counter()
            chosen.append(job)
        return chosen

    def _join(self, jobs: list[_Job]) -> None:
        requests = []
        for job in jobs:
            stm = job.conv.stm
            if job.conv.ready_event is not None:  # GPU: wait on the memory stream, not the host
                torch.cuda.current_stream(self.device).wait_event(job.conv.ready_event)
                stm.record_stream(torch.cuda.current_stream(self.device))
            requests.append(JoinRequest(id(job), job.request.prompt_ids, stm, job.request.params, job.seed))
            self._jobs[id(job)] = job
        try:
            first = self._batch.join(requests).tolist()
        except Exception as exc:
            for job in jobs:
                self._jobs.pop(id(job), None)
            self._fail_jobs(jobs, ModelExecutionError(f"prefill failed: {exc}"), cause=exc)
            return
        for job, token in zip(jobs, first):
            self._on_sampled(job, token)

    def _step(self) -> None:
        keys = list(self._batch.keys)
        try:
            tokens = self._batch.step().tolist()
        except Exception as exc:
            jobs = [self._jobs.pop(k) for k in keys]  # type: ignore[call-overload]
            for key in keys:
                self._batch.leave(key)
            self._fail_jobs(jobs, ModelExecutionError(f"decode step failed: {exc}"), cause=exc, leave=False)
            return
        for key, token in zip(keys, tokens):
            self._on_sampled(self._jobs[key], token)  # type: ignore[index]

    def _on_sampled(self, job: _Job, token: int) -> None:
        now = time.perf_counter()
        if job.first_token is None:
            job.first_token = now
        if job.cancelled:
            self._finish(job, "cancelled")
            return
        if token == self.config.special_tokens.eos_id:
            self._finish(job, "eos")
            return
        position = len(job.tokens)
        job.tokens.append(token)
        listener = job.listener
        job.conv.mailbox.post(lambda: listener.on_token(token, position))
        if len(job.tokens) >= job.limit:
            self._finish(job, "length")

    def _finish(self, job: _Job, reason: FinishReason) -> None:
        self._batch.leave(id(job))
        self._jobs.pop(id(job), None)
        now = time.perf_counter()
        first = job.first_token or now
        decode_time = now - first
        after_first = max(len(job.tokens) - 1, 0)
        stats = AnswerStats(
            ttft_s=first - job.submitted,
            tokens_per_s=after_first / decode_time if decode_time > 0 and after_first else 0.0,
            duration_s=now - job.submitted,
            queued_s=job.admitted - job.submitted,
        )
        conv, turn = job.conv, job.request.turn
        tokens = tuple(job.tokens)
        listener = job.listener
        remember = reason != "cancelled" or (job.request.remember_partial and bool(tokens))
        with self._lock:
            job.state = "done"
            conv.history.append(
                {
                    "turn": turn,
                    "finish_reason": reason,
                    "tokens": len(tokens),
                    "ttft_s": stats.ttft_s,
                    "tokens_per_s": stats.tokens_per_s,
                    "queued_s": stats.queued_s,
                }
            )
            conv.mailbox.post(lambda: listener.on_answer(tokens, reason, stats))
            if remember:
                ids = [*job.request.prompt_ids, *tokens, self.config.special_tokens.eos_id]
                self._enqueue_memory(_MemoryTask(conv, turn, ids))
            else:
                self._set_record(conv, turn, _MemoryRecord("skipped", conv.version))
                conv.busy = False
                self._lock.notify_all()

    def _fail_jobs(
        self, jobs: Sequence[_Job], exc: Exception, cause: BaseException | None = None, leave: bool = True
    ) -> None:
        if cause is not None:
            exc.__cause__ = cause
        log.error("turns failed: %s", exc)
        with self._lock:
            for job in jobs:
                if leave and id(job) in self._batch.keys:
                    self._batch.leave(id(job))
                job.state = "done"
                job.conv.busy = False
                listener = job.listener
                job.conv.mailbox.post(lambda listener=listener, v=job.conv.version: listener.on_error(exc, v))  # type: ignore[misc]
            self._lock.notify_all()

    def _fail_everything(self, exc: Exception) -> None:
        for job in list(self._waiting):
            self._drop_waiting(job, exc)
        active = list(self._jobs.values())
        self._jobs.clear()
        for job in active:
            job.state = "done"
            job.conv.busy = False
            listener = job.listener
            job.conv.mailbox.post(lambda listener=listener, v=job.conv.version: listener.on_error(exc, v))  # type: ignore[misc]

    def _drop_waiting(self, job: _Job, exc: Exception | None = None) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
        if job in job.conv.pending:
            job.conv.pending.remove(job)
        job.state = "done"
        if exc is not None:
            listener = job.listener
            job.conv.mailbox.post(lambda v=job.conv.version: listener.on_error(exc, v))  # type: ignore[misc]
        self._lock.notify_all()

    # ------------------------------------------------------------------ memory thread
    def _enqueue_memory(self, task: _MemoryTask) -> None:
        self._set_record(task.conv, task.turn, _MemoryRecord("queued", task.conv.version))
        with self._memory_cv:
            self._memory_queue.append(task)
            self._memory_cv.notify()

    def _memory_loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._memory_cv:
                    while not self._memory_queue and not self._closed:
                        self._memory_cv.wait()
                    if not self._memory_queue:  # closed and nothing owed
                        return
                    tasks = list(self._memory_queue)
                    self._memory_queue.clear()
                self._run_memory(tasks)

    def _run_memory(self, tasks: list[_MemoryTask]) -> None:
        # One conversation appears at most once per batch: its next turn cannot be queued before
        # this one commits. Batch everything else together.
        with self._lock:
            for t in tasks:
                record = _MemoryRecord("started", t.conv.version)
                self._set_record(t.conv, t.turn, record)
                self._notify_started(t.conv, t.turn)
            stms = [t.conv.stm for t in tasks]
            events = [t.conv.ready_event for t in tasks]
        start = time.perf_counter()
        try:
            new_stm, done_event = self._compute_memory(tasks, stms, events)
        except Exception as exc:
            self._memory_failed(tasks, ModelExecutionError(f"memory update failed: {exc}"), exc)
            return
        committed = list(zip(tasks, new_stm))
        if self.store is not None:  # persist first: memory and store never disagree
            if done_event is not None:
                done_event.synchronize()
            kept = []
            for t, stm in committed:
                try:
                    self._persist(t.conv.id, max(t.turn, 0), stm, t.conv.version + 1)
                    kept.append((t, stm))
                except Exception as exc:
                    self._memory_failed(
                        [t],
                        exc
                        if isinstance(exc, ConversationError)
                        else ModelExecutionError(f"could not store the new memory: {exc}"),
                        exc,
                    )
            committed = kept
        with self._lock:  # commit: the next turn of each conversation may now be admitted
            for t, stm in committed:
                t.conv.stm = stm
                t.conv.ready_event = done_event
                t.conv.version += 1
                t.conv.busy = False
            self._lock.notify_all()
        if done_event is not None:
            done_event.synchronize()  # only this thread waits; decode already queued behind the event
        duration = time.perf_counter() - start
        with self._lock:
            for t, _ in committed:
                record = _MemoryRecord("updated", t.conv.version, duration)
                self._set_record(t.conv, t.turn, record)
                self._post_record(t.conv, t.turn, record, self._take_watchers(t.conv, t.turn))
                if t.turn > 0:
                    t.conv.history.append({"turn": t.turn, "memory_update_s": duration, "stm_version": t.conv.version})

    def _memory_failed(self, tasks: list[_MemoryTask], error: Exception, cause: BaseException) -> None:
        """The STM of these conversations stays as it was; their turns report ``error``."""
        if error is not cause:
            error.__cause__ = cause
        log.error("%s", error)
        with self._lock:
            for t in tasks:
                record = _MemoryRecord("failed", t.conv.version, error=error)
                self._set_record(t.conv, t.turn, record)
                self._post_record(t.conv, t.turn, record, self._take_watchers(t.conv, t.turn))
                t.conv.busy = False
            self._lock.notify_all()

    def _persist(self, conversation_id: str, turns: int, stm: Tensor, version: int) -> None:
        if self.store is None:
            return
        from rxruntime.conversation import ConversationState, config_fingerprint

        cpu = stm.detach().to("cpu", torch.float32).clone()
        self.store.put(ConversationState(conversation_id, turns, version, cpu, config_fingerprint(self.config)))

    def _compute_memory(
        self, tasks: list[_MemoryTask], stms: list[Tensor], events: list[Any]
    ) -> tuple[list[Tensor], Any]:
        """Encode + memory attention for a batch of conversations -> each one's own new STM."""
        device = self.device
        lengths = [len(t.ids) for t in tasks]
        ids = torch.full((len(tasks), max(lengths)), self.config.special_tokens.pad_id, dtype=torch.long)
        mask = torch.zeros(len(tasks), max(lengths), dtype=torch.bool)
        for i, t in enumerate(tasks):
            ids[i, : lengths[i]] = torch.tensor(t.ids)
            mask[i, : lengths[i]] = True
        if self._memory_stream is None:
            new = self.model.memory_update(torch.stack(stms), ids.to(device), mask.to(device))
            return _split(new), None
        with torch.cuda.stream(self._memory_stream):  # pragma: no cover - GPU only
            for event in events:
                if event is not None:
                    self._memory_stream.wait_event(event)
            # the answer's decode ran on the default stream; the memory stream starts after it
            self._memory_stream.wait_stream(torch.cuda.default_stream(device))
            new = self.model.memory_update(
                torch.stack(stms), ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            )
            parts = _split(new)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(self._memory_stream)
        return parts, done

    # ------------------------------------------------------------------ memory bookkeeping (under lock)
    def _set_record(self, conv: _Conv, turn: int, record: _MemoryRecord) -> None:
        conv.records[turn] = record
        if len(conv.records) > _RECORDS_KEPT:
            del conv.records[min(conv.records)]
        if record.status == "skipped":
            self._post_record(conv, turn, record, self._take_watchers(conv, turn))

    def _take_watchers(self, conv: _Conv, turn: int) -> list[MemoryListener]:
        return conv.watchers.pop(turn, [])

    def _notify_started(self, conv: _Conv, turn: int) -> None:
        listeners = [*conv.watchers.get(turn, []), *conv.subscribers] if turn > 0 else list(conv.subscribers)
        version = conv.version
        for listener in listeners:
            conv.mailbox.post(lambda ls=listener: ls.on_memory_started(turn, version))  # type: ignore[misc]

    def _post_record(
        self, conv: _Conv, turn: int, record: _MemoryRecord, watchers: list[MemoryListener], replay: bool = False
    ) -> None:
        listeners = watchers if replay else [*watchers, *conv.subscribers]
        for listener in listeners:
            if record.status == "updated":
                if replay:
                    conv.mailbox.post(lambda ls=listener: ls.on_memory_started(turn, record.version - 1))  # type: ignore[misc]
                conv.mailbox.post(lambda ls=listener: ls.on_memory_updated(turn, record.version, record.duration))  # type: ignore[misc]
            elif record.status == "failed":
                assert record.error is not None
                error = record.error
                conv.mailbox.post(lambda ls=listener, e=error: ls.on_memory_failed(turn, e, record.version))  # type: ignore[misc]
            elif record.status == "skipped" and listener in watchers:
                conv.mailbox.post(lambda ls=listener: ls.on_memory_skipped(turn))  # type: ignore[misc]

    # ------------------------------------------------------------------ helpers
    def _conv(self, conversation_id: str) -> _Conv:
        try:
            return self._conversations[conversation_id]
        except KeyError:
            raise ConversationError(f"unknown conversation {conversation_id!r}") from None

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed")

    def _check_room(self, conv: _Conv, n: int) -> None:
        """Admission bounds (under the lock): QueueFullError before anything is queued."""
        if len(self._waiting) + n > self.max_queued_turns:
            raise QueueFullError(
                f"the engine has {len(self._waiting)} turns queued (max_queued_turns={self.max_queued_turns})"
            )
        if len(conv.pending) + n > self.max_turns_per_conversation:
            raise QueueFullError(
                f"conversation {conv.id!r} has {len(conv.pending)} turns queued "
                f"(max_turns_per_conversation={self.max_turns_per_conversation})"
            )

    def _check_memory_backlog(self) -> None:
        with self._memory_cv:
            backlog = len(self._memory_queue)
        if backlog >= self.max_memory_backlog:
            raise QueueFullError(f"{backlog} memory updates are waiting (max_memory_backlog={self.max_memory_backlog})")

    def _unreserve(self, conv: _Conv, turn: int) -> None:
        """Give back a turn number that was reserved but never ran, if no later one was taken."""
        if conv.next_turn == turn + 1:
            conv.next_turn = turn

    def _check_stm(self, stm: object) -> Tensor:
        """A user-given STM (layers, slots, dim): right shape, floating dtype, finite values."""
        expected = (self.config.num_layers, self.config.stm_size, self.config.dim)
        if not isinstance(stm, Tensor):
            raise ConversationError(f"stm must be a torch.Tensor of shape {expected}, got {type(stm).__name__}")
        if tuple(stm.shape) != expected:
            raise ConversationError(f"stm has shape {tuple(stm.shape)}; the model needs (L, S, D) {expected}")
        if not stm.dtype.is_floating_point:
            raise ConversationError(f"stm must hold floating-point values, got {stm.dtype}")
        if not bool(torch.isfinite(stm).all()):
            raise ConversationError("stm holds NaN or infinite values")
        return stm.detach().to(self.device, self.model.dtype).clone()


class _MemorizeWaiter:
    """Waits for the memory commits of a ``memorize`` call, in order; keeps the first failure."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._done = [threading.Event() for _ in range(n)]
        self._versions = [0] * n
        self._errors: list[Exception | None] = [None] * n

    def listener(self, i: int) -> _MemorizeListener:
        return _MemorizeListener(self, i)

    def settle(self, i: int, version: int, error: Exception | None) -> None:
        if not self._done[i].is_set():
            self._versions[i], self._errors[i] = version, error
            self._done[i].set()

    def wait(self, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        for i in range(self._n):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._done[i].wait(remaining):
                raise TimeoutError(f"interaction {i} was not written to memory within {timeout} s")
            error = self._errors[i]
            if error is not None:
                raise error
        return self._versions[-1]


class _MemorizeListener:
    """Turn and memory callbacks of one memorized interaction."""

    def __init__(self, waiter: _MemorizeWaiter, i: int) -> None:
        self._waiter, self._i = waiter, i

    def on_token(self, token_id: int, position: int) -> None:
        pass

    def on_answer(self, token_ids: tuple[int, ...], finish_reason: FinishReason, stats: AnswerStats) -> None:
        pass

    def on_error(self, exc: Exception, stm_version: int) -> None:
        self._waiter.settle(self._i, stm_version, exc)

    def on_memory_started(self, turn: int, stm_version: int) -> None:
        pass

    def on_memory_updated(self, turn: int, stm_version: int, duration_s: float) -> None:
        self._waiter.settle(self._i, stm_version, None)

    def on_memory_failed(self, turn: int, exc: Exception, stm_version: int) -> None:
        self._waiter.settle(self._i, stm_version, exc)

    def on_memory_skipped(self, turn: int) -> None:
        self._waiter.settle(self._i, 0, ConversationError(f"turn {turn} was not written to memory"))


def _split(stm: Tensor) -> list[Tensor]:
    """One owned (L, S, D) tensor per conversation, so a conversation never pins the whole batch."""
    return [stm[0]] if stm.shape[0] == 1 else [s.clone() for s in stm]


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]
