"""The :class:`Engine`: one per model, the public face of the engine's rooms.

It checks every request at the door (options, token ids, snapshots, bounds), then hands work to
the :mod:`scheduler <rxruntime.engine.scheduler>` (admission and order), whose admitted turns the
:mod:`decode loop <rxruntime.engine.decode_loop>` runs and whose memory work the
:mod:`memory worker <rxruntime.engine.memory_worker>` commits. Conversations' lifecycle (open,
close, delete, reset, restore, eviction and resumption from the store) lives here.

The engine never calls user code on its threads: listener callbacks go through each
conversation's :class:`~rxruntime.events.Mailbox`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

from rxruntime.backend import AnswerStats, MemoryListener, TurnListener, TurnRequest
from rxruntime.conversation import Conversation
from rxruntime.errors import (
    ConversationError,
    EngineClosedError,
    InvalidOptionError,
    QueryTooLongError,
    QueueFullError,
    RxTError,
)
from rxruntime.events import FinishReason, Mailbox, TokenLogprob
from rxruntime.models import native, openmp
from rxruntime.models.rxt import RxTModel
from rxruntime.models.sampler import SamplingParams
from rxruntime.models.tokenizer import RxTokenizer
from rxruntime.options import check_logprobs, check_seconds, check_token_ids, normalize
from rxruntime.snapshot import ConversationState
from rxruntime.stores import STMStore, overwrite

from .decode_loop import DecodeLoop
from .memory_worker import MemoryWorker, evict
from .scheduler import ConversationEntry, Install, Job, Scheduler, post_record

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class Engine:
    """Runs an RxT model for many conversations at once. Use as a context manager or ``close()``.

    Bounds (each refused with :class:`~rxruntime.errors.QueueFullError`, nothing queued):
    ``max_queued_turns`` turns waiting in the whole engine, ``max_turns_per_conversation`` in one
    conversation, ``max_memory_backlog`` memory updates waiting (``memory_init`` bursts). The memory
    worker runs the updates queued together as one batch of at most ``max_memory_batch`` (a batch's
    activations grow with it, about 0.2 GB per conversation at RxT-Beta's size). With a store, at
    most ``max_resident`` conversations keep their STM in memory (None: no limit), and at most
    ``max_resident_bytes`` bytes of STMs (None: no limit; RxT-Beta's STM is 176 MB in float32,
    alpha-mini's 3 MiB, so a count alone says little about memory); the least recently used idle
    ones are evicted and resume from the store when next used. ``store_writers`` threads write
    committed STMs to the store, so a slow write holds back its own conversation only.
    """

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
        max_memory_batch: int = 32,
        max_resident: int | None = 10_000,
        max_resident_bytes: int | None = None,
        store_writers: int = 4,
    ) -> None:
        for name, value, low in (
            ("max_resident_bytes", max_resident_bytes, 0),
            ("store_writers", store_writers, 1),
            ("max_memory_batch", max_memory_batch, 1),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InvalidOptionError(name, f"must be an integer >= {low}, got {value!r}")
        self.model = model.eval()
        tokenizer.use_template(model.config)  # the model's message template (interaction_template)
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_seq_len = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        default_sampling = default_sampling or SamplingParams.model_default(model.config)  # greedy, its penalties
        self.default_sampling = normalize(default_sampling, self.vocab_size)
        self.device = model.device
        self.store = store
        self.max_queued_turns = max_queued_turns
        self.max_turns_per_conversation = max_turns_per_conversation
        self.max_memory_backlog = max_memory_backlog
        self._sched = Scheduler(
            max_queued_turns=max_queued_turns,
            max_turns_per_conversation=max_turns_per_conversation,
            max_resident=max_resident if store is not None else None,
            max_resident_bytes=max_resident_bytes if store is not None else None,
        )
        self._lock = self._sched.lock
        self._memory = MemoryWorker(
            model,
            self._sched,
            store,
            max_backlog=max_memory_backlog,
            store_writers=store_writers,
            max_batch=max_memory_batch,
        )
        self._decode = DecodeLoop(model, self._sched, self._memory, max_batch=max_batch)
        if self.device.type == "cpu" and model.native_decode:
            # build the C decode step (once per machine) and make its weight copies now, not in the first turn
            native.prepare(model, release_experts=False)
        self._delivery = ThreadPoolExecutor(delivery_threads, thread_name_prefix="rxrt-deliver")
        self._decode.start()
        self._memory.start()
        # The caller's OpenMP team (from loading the model, most likely) would make every torch op
        # on the engine's threads wake its workers from a futex: give it back (models/openmp.py).
        openmp.release_idle_threads()
        # Closed at interpreter exit (or when garbage-collected) if the program never calls close():
        # a daemon thread still inside a torch call at finalisation aborts the whole process.
        self._finalizer = weakref.finalize(self, _shutdown, self._sched, self._decode, self._memory, self._delivery)

    # ------------------------------------------------------------------ conversations
    @openmp.serial()  # small tensor work on the caller's thread: no OpenMP team for it
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
        text, written to memory in the background before the first turn, in the model's
        ``interaction_template``), a saved ``state``, or a given ``stm`` tensor of shape
        (layers, slots, dim) (e.g. RxLM's exported STM without its batch axis), checked for
        shape, dtype and finite values. ``stm`` and ``memory_init`` combine: the system text is
        read into the given STM (as RxLM's ``init_stm_state`` after ``load_stm_state``).

        With a store, an id the store knows resumes from its stored memory (``memory_init`` is
        then ignored); a given ``state`` or ``stm`` is written to the store. Opening an id that
        was just closed while its memory update runs resumes that memory."""
        if state is not None and (memory_init is not None or stm is not None):
            raise ConversationError("a saved state excludes memory_init and stm: pass at most one of them")
        if memory_init is not None and not isinstance(memory_init, str):
            raise InvalidOptionError("memory_init", f"must be a string, got {type(memory_init).__name__}")
        if conversation_id is not None and (not isinstance(conversation_id, str) or not conversation_id):
            raise InvalidOptionError("conversation_id", "must be a non-empty string")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise InvalidOptionError("seed", "must be an integer in [0, 2**63)")
        if state is not None:
            state.check_fits(self.config)
            conversation_id = conversation_id or state.conversation_id
        given = None if stm is None else self._check_stm(stm)
        conversation_id = conversation_id or _new_id()
        with self._lock:
            self._sched.check_open()
            existing = self._sched.conversations.get(conversation_id)
            if existing is not None and existing.open:
                raise ConversationError(f"conversation {conversation_id!r} already exists in this engine")
            if existing is not None:  # closed while its memory update runs: take it up again
                existing.open = True
        if existing is not None:
            if state is not None or given is not None:
                self._install(existing, state.stm if state is not None else given, state)  # type: ignore[arg-type]
            return Conversation(self, conversation_id)

        stored = None
        if state is None and given is None and self.store is not None:
            stored = self.store.get(conversation_id)  # a stored conversation resumes where it was
            if stored is not None:
                stored.check_fits(self.config)
                memory_init = None
        start = state or stored
        stm_seed = seed if seed is not None else zlib.crc32(conversation_id.encode())
        if start is not None:
            initial = start.stm.to(self.device, self.model.dtype)
        elif given is not None:
            initial = given
        else:
            initial = self._random_stm(stm_seed)
        conv = ConversationEntry(id=conversation_id, stm=initial, mailbox=Mailbox(self._delivery), seed=stm_seed)
        if start is not None:
            conv.version, conv.committed_turn, conv.next_turn = start.stm_version, start.turn, start.turn + 1
        if self.store is not None and (state is not None or given is not None):
            conv.version = self._store_new(conv, initial)  # what the caller gave is durable at once
        with self._lock:
            self._sched.check_open()
            if conversation_id in self._sched.conversations:
                raise ConversationError(f"conversation {conversation_id!r} already exists in this engine")
            if memory_init is not None:
                self._check_memory_room(conv, 1)
            self._sched.conversations[conversation_id] = conv
            self._sched.touch(conv)
            if memory_init is not None:
                self._queue_memory_init(conv, memory_init)  # its update makes the first turn's memory K/V
            else:
                self._memory.project_opened(conv)  # the first turn's memory K/V, while the caller writes its query
            self._evict()
        return Conversation(self, conversation_id)

    def close_conversation(self, conversation_id: str) -> None:
        """Forget a conversation: its queued turns fail with ConversationError, a running one is
        cancelled. A completed answer's memory update still commits (and is persisted); opening
        the same id meanwhile resumes from that memory."""
        with self._lock:
            conv = self._sched.get(conversation_id)
            closed = ConversationError(f"conversation {conversation_id!r} was closed")
            for job in list(conv.pending):
                self._sched.drop_waiting(job, closed)
            for job in self._decode_jobs(conv):
                job.cancelled = True
            conv.open = False
            for turn in list(conv.reserved):
                self._sched.release_turn(conv, turn)
            self._sched.forget_if_done(conv)

    def delete_conversation(self, conversation_id: str) -> None:
        """Close a conversation and remove its memory from the store.

        A memory update already running commits first and is then deleted with the rest, so
        nothing is written back afterwards. An id that is not open but is stored is deleted from
        the store; an id known to neither raises ConversationError."""
        with self._lock:
            conv = self._sched.conversations.get(conversation_id)
            conv = conv if conv is not None and conv.open else None
        if conv is not None:
            self.close_conversation(conversation_id)
            with self._lock:
                while conv.busy and not self._sched.closed:
                    self._lock.wait(0.5)
                if not conv.open:  # not re-opened meanwhile
                    self._sched.forget_if_done(conv)
        elif self.store is None or self.store.get(conversation_id) is None:
            raise ConversationError(f"unknown conversation {conversation_id!r}")
        if self.store is not None:
            self.store.delete(conversation_id)

    @contextlib.contextmanager
    def together(self, max_wait: float = 1.0) -> Iterator[None]:
        """Turns sent inside the block start together when it ends: one prefill for all of them,
        as a batch API's would, instead of a join for whichever arrived first and another for the
        rest (each join reads all the weights; on a CPU a split burst costs a second prefill's
        fixed part and a decode step). Turns under way go on decoding meanwhile. Admission waits
        ``max_wait`` seconds at most, so a block that waits on its own turn (``ask`` inside it)
        is that much late, never stuck::

            with engine.together():
                streams = [conv.interact(q) for conv, q in zip(convs, queries)]
                subscriptions = [s.subscribe(on_event) for s in streams]
        """
        wait = check_seconds("max_wait", max_wait)
        with self._lock:
            token = self._sched.hold(wait)
        try:
            yield
        finally:
            with self._lock:
                self._sched.unhold(token)

    @property
    def queue_depth(self) -> int:
        """Turns accepted but not yet started (decode or memory-only), over all conversations."""
        with self._lock:
            return len(self._sched.waiting)

    @property
    def open_conversations(self) -> int:
        """Conversations open in this engine (resident or evicted to the store)."""
        with self._lock:
            return sum(1 for c in self._sched.conversations.values() if c.open)

    def stats(self) -> dict[str, int]:
        """Counters for monitoring (e.g. a /metrics endpoint)."""
        with self._lock:
            waiting, active = len(self._sched.waiting), self._decode.active
            conversations = sum(1 for c in self._sched.conversations.values() if c.open)
            resident, resident_bytes = self._sched.resident, self._sched.resident_bytes
            backlog = self._memory_backlog()
        return {
            "queue_depth": waiting,
            "active_turns": active,
            "memory_backlog": backlog,
            "open_conversations": conversations,
            "resident_conversations": resident,
            "resident_bytes": resident_bytes,
            "max_batch": self._decode.batch.capacity,
            "max_queued_turns": self.max_queued_turns,
        }

    def stm_version(self, conversation_id: str) -> int:
        with self._lock:
            return self._sched.get(conversation_id).version

    def memory_error(self, conversation_id: str) -> Exception | None:
        """Why the conversation's last memory update failed, or None if it committed."""
        with self._lock:
            return self._sched.get(conversation_id).memory_error

    @openmp.serial()  # small tensor work on the caller's thread: no OpenMP team for it
    def snapshot(self, conversation_id: str) -> tuple[Tensor, int, int]:
        """(STM on the CPU, version, turns so far) of the last committed memory."""

        def take(conv: ConversationEntry) -> tuple[Tensor, int, int, object]:
            assert conv.stm is not None
            return conv.stm, conv.version, conv.committed_turn, conv.ready_event

        stm, version, turn, event = self._resident(conversation_id, take)
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]
        return stm.detach().to("cpu", torch.float32).clone(), version, turn

    @openmp.serial()  # small tensor work on the caller's thread: no OpenMP team for it
    def reset(self, conversation_id: str, memory_init: str | None = None, seed: int | None = None) -> None:
        """Give a conversation a fresh STM, after its queued turns; blocks until it is committed.
        ``memory_init`` is then written in the background before the next turn."""
        if memory_init is not None and not isinstance(memory_init, str):
            raise InvalidOptionError("memory_init", f"must be a string, got {type(memory_init).__name__}")
        with self._lock:
            conv = self._sched.get(conversation_id)
            conv_seed = conv.seed
        self._install(conv, self._random_stm(seed if seed is not None else conv_seed), None, memory_init)

    @openmp.serial()  # small tensor work on the caller's thread: no OpenMP team for it
    def load_state(self, conversation_id: str, state: ConversationState) -> None:
        """Replace a conversation's STM with a saved snapshot, after its queued turns; blocks until
        committed (and persisted, with a store). Refuses snapshots that do not fit the model,
        hold non-finite values or carry counters the store cannot hold."""
        state.check_fits(self.config)
        with self._lock:
            conv = self._sched.get(conversation_id)
        self._install(conv, state.stm, state)

    @openmp.serial()  # small tensor work on the caller's thread: no OpenMP team for it
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

        def queue(conv: ConversationEntry) -> list[Job]:
            self._sched.check_open()
            self._check_memory_room(conv, len(prompts))
            jobs = []
            for i, ids in enumerate(prompts):
                turn = self._sched.number_turn(conv)
                request = TurnRequest(conversation_id, turn, (), self.default_sampling)
                job = Job(request, waiter.listener(i), conv, 0, time.perf_counter(), 0, order=turn, memory_ids=ids)
                conv.watchers.setdefault(turn, []).append(waiter.listener(i))
                self._sched.submit(job)
                jobs.append(job)
            return jobs

        jobs = self._resident(conversation_id, queue)
        try:
            return waiter.wait(timeout)
        except BaseException:
            with self._lock:  # the pairs not started yet are not written
                for job in jobs:
                    if job.phase == "waiting":
                        self._sched.drop_waiting(job)
            raise

    def wait_idle(self, conversation_id: str, timeout: float | None = None) -> bool:
        """Wait until the conversation has no queued turn, no decode and no pending memory update."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            conv = self._sched.get(conversation_id)
            while conv.busy or conv.pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return conv.mailbox.wait_idle(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def history(self, conversation_id: str) -> list[dict[str, float | int | str]]:
        with self._lock:
            return list(self._sched.get(conversation_id).history)

    def subscribe_memory(self, conversation_id: str, listener: MemoryListener) -> Callable[[], None]:
        """Listen to the memory events of every turn of a conversation."""
        with self._lock:
            conv = self._sched.get(conversation_id)
            conv.subscribers.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in conv.subscribers:
                    conv.subscribers.remove(listener)

        return unsubscribe

    # ------------------------------------------------------------------ Backend protocol
    def next_turn(self, conversation_id: str) -> int:
        """Reserve the next turn number of a conversation (QueueFullError over the bounds)."""
        with self._lock:
            return self._sched.reserve_turn(self._sched.get(conversation_id))

    def release_turn(self, conversation_id: str, turn: int) -> None:
        """Give up a reserved turn that will never start (a no-op once it has started)."""
        with self._lock:
            conv = self._sched.conversations.get(conversation_id)
            if conv is not None:
                self._sched.release_turn(conv, turn)

    @openmp.serial()  # small tensor work on the caller's thread: no OpenMP team for it
    def start_turn(self, request: TurnRequest, listener: TurnListener) -> Callable[[], None]:
        """Queue a turn; returns ``cancel`` (stops it within one decode step if still running).

        The request is checked first (sampling values, token ids, length, bounds); a refused one
        reports its typed error to ``listener`` and gives its turn number back."""
        try:
            params = normalize(request.params, self.vocab_size)
            prompt = tuple(check_token_ids(request.prompt_ids, self.vocab_size, "prompt_ids"))
            if request.max_new_tokens is not None and (
                isinstance(request.max_new_tokens, bool)
                or not isinstance(request.max_new_tokens, int)
                or request.max_new_tokens < 1
            ):
                raise InvalidOptionError("max_new_tokens", f"must be an integer >= 1, got {request.max_new_tokens!r}")
            check_logprobs(request.logprobs)
            refused: Exception | None = None
        except RxTError as exc:
            params, prompt, refused = request.params, request.prompt_ids, exc
        limit = self.max_seq_len - len(prompt) - 1
        cap = request.max_new_tokens if request.max_new_tokens is not None else self.config.answer_tokens
        if cap is not None and refused is None:  # the turn's own cap, else the model's default
            limit = min(limit, cap)
        if refused is None and (limit < 1 or len(prompt) < 1):
            refused = QueryTooLongError(
                f"the prompt has {len(prompt)} tokens; an interaction holds at most "
                f"{self.max_seq_len} including the answer and [EOS]"
            )
        job: Job | None = None

        def queue(conv: ConversationEntry) -> None:
            nonlocal job
            error = refused
            if error is None and self._sched.closed:
                error = EngineClosedError("the engine is closed")
            if error is None and request.turn not in conv.reserved:
                try:
                    self._sched.check_room(conv, 1)
                except QueueFullError as full:
                    error = full
            if error is not None:
                self._sched.unreserve(conv, request.turn)
                conv.mailbox.post(lambda v=conv.version, e=error: listener.on_error(e, v))  # type: ignore[misc]
                return
            req = TurnRequest(
                request.conversation_id,
                request.turn,
                prompt,
                params,
                request.max_new_tokens,
                request.remember_partial,
                request.remember,
                request.logprobs,
            )
            job = Job(req, listener, conv, params.resolved_seed(), time.perf_counter(), limit, order=request.turn)
            self._sched.submit(job)

        self._resident(request.conversation_id, queue, load=refused is None)

        def cancel() -> None:
            with self._lock:
                if job is None:
                    return
                if job.phase == "waiting":
                    self._sched.drop_waiting(job)
                elif job.phase == "active":
                    job.cancelled = True  # the decode thread acts on it at the next step

        return cancel

    def watch_memory(self, conversation_id: str, turn: int, listener: MemoryListener) -> Callable[[], None]:
        """Memory callbacks of one turn; replays what already happened if the watcher is late."""
        with self._lock:
            conv = self._sched.conversations.get(conversation_id)
            if conv is None:
                raise ConversationError(f"unknown conversation {conversation_id!r}")
            record = conv.records.get(turn)
            if record is not None and record.status in ("updated", "failed", "skipped"):
                post_record(conv, turn, record, [listener], replay=True)
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

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting turns, fail queued ones, finish memory updates already owed, stop threads.

        A program that never calls it still exits cleanly: an engine still open at interpreter
        exit (or garbage-collected) is closed then, committing the memory updates it owes."""
        if self._finalizer.detach() is not None:
            _shutdown(self._sched, self._decode, self._memory, self._delivery, timeout)

    @property
    def closed(self) -> bool:
        return self._sched.closed

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _resident(self, conversation_id: str, fn: Callable[[ConversationEntry], _T], load: bool = True) -> _T:
        """Run ``fn(conv)`` under the lock with the conversation's STM in memory (read back from
        the store first if it was evicted; the read happens outside the lock)."""
        for _ in range(8):
            with self._lock:
                conv = self._sched.get(conversation_id)
                if conv.stm is not None or not load:
                    return fn(conv)
            self._reload(conv)
        raise ConversationError(f"conversation {conversation_id!r}: could not load its memory")

    def _reload(self, conv: ConversationEntry) -> None:
        stored = self.store.get(conv.id) if self.store is not None else None
        if stored is not None:
            stored.check_fits(self.config)
            stm = stored.stm.to(self.device, self.model.dtype)
        else:
            if conv.version:
                log.warning("conversation %r: the store lost its memory v%d; starting afresh", conv.id, conv.version)
            stm = self._random_stm(conv.seed)
        with self._lock:
            if conv.stm is None:
                conv.stm, conv.ready_event, conv.memory_kv = stm, None, None
                if stored is not None and stored.stm_version >= conv.version:
                    conv.version = stored.stm_version
                    conv.committed_turn = max(conv.committed_turn, stored.turn)
                    conv.next_turn = max(conv.next_turn, stored.turn + 1)
                self._sched.touch(conv)
                self._evict(keep=conv)

    def _evict(self, keep: ConversationEntry | None = None) -> None:
        """Drop the least recently used idle STMs beyond ``max_resident`` (under the lock)."""
        for victim in self._sched.evictable():
            if victim is keep:
                self._sched.touch(victim)
                continue
            evict(victim)

    def _install(
        self, conv: ConversationEntry, stm: Tensor, state: ConversationState | None, memory_init: str | None = None
    ) -> None:
        """Commit a given STM through the memory worker, in order with the conversation's turns."""
        install = Install(
            stm.detach().to(self.device, self.model.dtype).clone(),
            version=None if state is None else state.stm_version + 1,
        )

        def queue(c: ConversationEntry) -> None:
            self._sched.check_open()
            self._check_memory_room(c, 2 if memory_init is not None else 1)
            request = TurnRequest(c.id, 0, (), self.default_sampling)
            job = Job(request, _InstallListener(install), c, 0, time.perf_counter(), 0, order=c.next_turn - 0.5)
            job.install = install
            self._sched.submit(job)
            if memory_init is not None:
                self._queue_memory_init(c, memory_init)

        self._resident(conv.id, queue, load=False)
        install.done.wait()
        if install.error is not None:
            raise install.error

    def _store_new(self, conv: ConversationEntry, stm: Tensor) -> int:
        """Write a caller-given STM to the store at once; returns its version there."""
        assert self.store is not None
        version = overwrite(self.store, self.config, conv.id, conv.committed_turn, stm, conv.version)
        if version is None:
            raise ConversationError(f"conversation {conv.id!r}: could not store the given memory")
        return version

    def _queue_memory_init(self, conv: ConversationEntry, text: str) -> None:
        ids = self.tokenizer.system_ids(text)[: self.max_seq_len]
        request = TurnRequest(conv.id, 0, (), self.default_sampling)
        job = Job(request, _Silent(), conv, 0, time.perf_counter(), 0, order=conv.next_turn - 0.25, memory_ids=ids)
        self._sched.submit(job)

    def _check_memory_room(self, conv: ConversationEntry, n: int) -> None:
        """Bounds for memory-only work (under the lock): queued turns and the memory backlog."""
        self._sched.check_room(conv, n)
        backlog = self._memory_backlog()
        if backlog + n > self.max_memory_backlog:
            raise QueueFullError(f"{backlog} memory updates are waiting (max_memory_backlog={self.max_memory_backlog})")

    def _memory_backlog(self) -> int:
        """Memory updates queued: in the memory worker, or admitted-to-be (under the lock)."""
        waiting = sum(1 for j in self._sched.waiting if j.memory_ids is not None or j.install is not None)
        return self._memory.backlog + waiting

    def _decode_jobs(self, conv: ConversationEntry) -> list[Job]:
        return [job for job in self._decode._jobs.values() if job.conv is conv]

    def _random_stm(self, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return self.model.init_stm(1, gen)[0].to(self.device)

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


class _Silent:
    """Listener of a background memory-only job (``memory_init``): failures are logged."""

    def on_token(self, token_id: int, position: int, logprobs: TokenLogprob | None = None) -> None:
        pass

    def on_answer(self, token_ids: tuple[int, ...], finish_reason: FinishReason, stats: AnswerStats) -> None:
        pass

    def on_error(self, exc: Exception, stm_version: int) -> None:
        log.warning("memory_init was not written: %s", exc)


class _InstallListener(_Silent):
    """A dropped install job (the conversation or engine closed) wakes its caller with the error."""

    def __init__(self, install: Install) -> None:
        self._install = install

    def on_error(self, exc: Exception, stm_version: int) -> None:
        self._install.error = exc
        self._install.done.set()


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


class _MemorizeListener(_Silent):
    """Turn and memory callbacks of one memorized interaction."""

    def __init__(self, waiter: _MemorizeWaiter, i: int) -> None:
        self._waiter, self._i = waiter, i

    def on_error(self, exc: Exception, stm_version: int) -> None:
        self._waiter.settle(self._i, stm_version, exc)

    def on_memory_started(self, turn: int, stm_version: int) -> None:
        pass

    def on_memory_updated(
        self,
        turn: int,
        stm_version: int,
        duration_s: float,
        change: tuple[float, ...] = (),
        gate: tuple[float, ...] = (),
    ) -> None:
        self._waiter.settle(self._i, stm_version, None)

    def on_memory_failed(self, turn: int, exc: Exception, stm_version: int) -> None:
        self._waiter.settle(self._i, stm_version, exc)

    def on_memory_skipped(self, turn: int) -> None:
        self._waiter.settle(self._i, 0, ConversationError(f"turn {turn} was not written to memory"))


def _shutdown(
    sched: Scheduler,
    decode: DecodeLoop,
    memory: MemoryWorker,
    delivery: ThreadPoolExecutor,
    timeout: float | None = 30.0,
) -> None:
    """Close an engine's rooms: no new turns, queued ones fail, owed memory updates commit."""
    with sched.lock:
        if sched.closed and not decode.alive and not memory.alive:
            return
        sched.closed = True
        sched.lock.notify_all()
    own = threading.current_thread().name.startswith("rxrt-")  # dropped on one of our own threads
    if not own:
        decode.join(timeout)
        memory.stop(timeout)
        with sched.lock:
            conversations = list(sched.conversations.values())
        for conv in conversations:
            conv.mailbox.wait_idle(timeout)
    else:
        memory.stop(0)
    delivery.shutdown(wait=not own)


def _new_id() -> str:
    return uuid.uuid4().hex[:12]
