"""The memory worker: the asynchronous half of every turn, and every commit of a new STM.

On its own thread (and, on a GPU, its own CUDA stream) it runs encoder + memory attention over
``[BOS][Q] query [A] answer [EOS]`` for a batch of conversations, then commits each one's STM(t)
(version + 1): persisted to the store first, so memory and store never disagree, then made
visible, which lets the conversation's next turn start. ``reset`` and ``load_state`` commit here
too (an *install*: a given STM, no model call), so every change of a conversation's memory is
ordered with its turns and written the same way.

Batching: each pass takes the updates queued at that moment, at most ``max_batch`` of them, and
runs them as one padded batch (the padding is masked, so each conversation's STM(t) is what it
would be alone); it never waits for more, so a lone update starts at once. A conversation has at
most one task queued (its next turn waits for this commit), so a batch holds each one once.

With a store, each committed STM is written once, by one of ``store_writers`` writer threads
rather than by the memory thread itself: a conversation's memory commits once its own write is
done, and a slow write (RxT-Beta's STM is 88-176 MB) holds back that conversation alone, never
another conversation's memory update or turn.

Failures stay with their conversation: a batch that raises is retried one conversation at a time,
and an update that yields NaN or infinite values is refused; either way that turn fails and its
STM keeps its last version. If the store holds a newer version than this worker's (another worker
moved the conversation on), the update is refused with StaleStateError and the conversation
re-reads the store, so its next turn runs on the newest memory instead of failing forever.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rxruntime.errors import ConversationError, ModelExecutionError, QueueFullError
from rxruntime.models.decoder import MemoryKV
from rxruntime.models.openmp import release_idle_threads
from rxruntime.models.rxt import RxTModel, memory_change
from rxruntime.snapshot import ConversationState
from rxruntime.stores import StaleStateError, STMStore, newer_copy, overwrite, persist

from .scheduler import ConversationEntry, MemoryRecord, MemoryTask, Scheduler, notify_started, set_record, settle

log = logging.getLogger(__name__)


class MemoryWorker:
    def __init__(
        self,
        model: RxTModel,
        scheduler: Scheduler,
        store: STMStore | None,
        *,
        max_backlog: int,
        store_writers: int = 4,
        max_batch: int = 32,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch  # memory updates computed together
        self.config = model.config
        self.device = model.device
        self.store = store
        self.max_backlog = max_backlog
        self._sched = scheduler
        self._queue: deque[MemoryTask] = deque()
        self._opened: deque[tuple[ConversationEntry, int]] = deque()  # (conversation, its STM version)
        self._cv = threading.Condition()
        self._stopping = False
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(target=self._loop, name="rxrt-memory", daemon=True)
        self._writers = _Writers(store_writers) if store is not None else None
        self._writing = 0  # STMs handed to the writers, not yet committed (under self._cv)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None) -> None:
        """Run every update already owed, write every STM owed to the store, then stop."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._writers is not None:
            self._writers.stop(timeout if not self._thread.is_alive() else 0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def backlog(self) -> int:
        with self._cv:
            return len(self._queue) + self._writing

    def check_backlog(self) -> None:
        backlog = self.backlog
        if backlog >= self.max_backlog:
            raise QueueFullError(f"{backlog} memory updates are waiting (max_memory_backlog={self.max_backlog})")

    def enqueue(self, task: MemoryTask) -> None:
        """Queue a task (under the scheduler's lock; the conversation is already busy)."""
        if task.install is None:
            set_record(task.conv, task.turn, MemoryRecord("queued", task.conv.version))
        with self._cv:
            self._queue.append(task)
            self._cv.notify()

    def project_opened(self, conv: ConversationEntry) -> None:
        """Project a just-opened conversation's memory keys/values for its first turn when this
        thread has nothing else to do (CPU only; under the scheduler's lock): a conversation
        opened before its first query then starts that turn as every later one does."""
        if self._stream is not None:  # on a GPU the first join projects (no stream handoff here)
            return
        with self._cv:
            self._opened.append((conv, conv.version))
            self._cv.notify()

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    released = False
                    while not self._queue and not self._opened and not self._stopping:
                        if not released:  # idle: its OpenMP team would slow the decode thread's
                            release_idle_threads()
                            released = True
                        self._cv.wait()
                    if not self._queue and (self._stopping or not self._opened):  # stopping and nothing owed
                        return
                    if not self._queue:  # idle: the first turn's keys/values of an opened conversation
                        opened = self._opened.popleft()
                        tasks = []
                    else:
                        opened = None
                        # what is queued now, up to max_batch; the rest waits for the next pass
                        tasks = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
                if opened is not None:
                    try:
                        self._project(*opened)
                    except Exception:  # only a head start: the first join projects instead
                        log.exception("projecting an opened conversation's memory failed")
                    continue
                try:
                    self._run(tasks)
                except Exception as exc:  # a bug here must not strand the conversations
                    log.exception("memory worker failed")
                    self._fail(tasks, ModelExecutionError(f"memory update failed: {exc}"), exc)

    def _run(self, tasks: list[MemoryTask]) -> None:
        # One conversation appears at most once per batch: its next task cannot be queued before
        # this one commits. Batch every model update together.
        with self._sched.lock:
            missing = [t for t in tasks if t.install is None and t.conv.stm is None]
            for t in tasks:
                if t.install is None and t.conv.stm is not None:
                    set_record(t.conv, t.turn, MemoryRecord("started", t.conv.version))
                    notify_started(t.conv, t.turn)
        if missing:
            self._fail(missing, ModelExecutionError("the conversation's memory was not loaded"), None)
            tasks = [t for t in tasks if t not in missing]
        start = time.perf_counter()
        updates = [t for t in tasks if t.install is None]
        results: dict[int, Tensor] = {}
        changes: dict[int, Tensor] = {}
        kvs: dict[int, MemoryKV] = {}
        done_event = None
        if updates:
            try:
                new_stm, change, done_event, kv = self._compute(updates)
                results.update({id(t): s for t, s in zip(updates, new_stm)})
                changes.update({id(t): c for t, c in zip(updates, change)})
                kvs.update({id(t): k for t, k in zip(updates, kv)})
            except Exception as exc:
                if len(updates) == 1:
                    self._fail(updates, ModelExecutionError(f"memory update failed: {exc}"), exc)
                else:  # find the one that fails; the others commit
                    for t in updates:
                        try:
                            one, change, done_event, kv = self._compute([t])
                            results[id(t)] = one[0]
                            changes[id(t)] = change[0]
                            kvs[id(t)] = kv[0]
                        except Exception as single:
                            self._fail([t], ModelExecutionError(f"memory update failed: {single}"), single)
        if done_event is not None and (self.store is not None or results):
            done_event.synchronize()  # only this thread waits; decode is queued behind the event
        stats = {key: _per_layer(change) for key, change in changes.items()}  # after the sync: no stall
        committed: list[tuple[MemoryTask, Tensor, int, MemoryKV | None]] = []
        for t in tasks:
            stm = t.install.stm if t.install is not None else results.get(id(t))
            if stm is None:
                continue
            if not bool(torch.isfinite(stm).all()):
                self._fail([t], ModelExecutionError("the memory update produced NaN or infinite values"), None)
                continue
            if self._writers is not None:  # the write, then the commit, off this thread
                with self._cv:
                    self._writing += 1
                self._writers.submit(self._write_and_commit, t, stm, start, done_event, stats, kvs.get(id(t)))
                continue
            version = self._persist(t, stm)
            if version is not None:
                committed.append((t, stm, version, kvs.get(id(t))))
        self._commit(committed, time.perf_counter() - start, done_event, stats)

    def _write_and_commit(
        self,
        task: MemoryTask,
        stm: Tensor,
        start: float,
        done_event: Any,
        stats: dict[int, Any],
        kv: MemoryKV | None,
    ) -> None:
        """A writer thread: store one conversation's new STM, then commit it (its next turn may start)."""
        try:
            version = self._persist(task, stm)
            if version is not None:
                self._commit([(task, stm, version, kv)], time.perf_counter() - start, done_event, stats)
        except Exception as exc:  # a bug here must not strand the conversation
            log.exception("store writer failed")
            self._fail([task], ModelExecutionError(f"memory commit failed: {exc}"), exc)
        finally:
            with self._cv:
                self._writing -= 1

    def _commit(
        self,
        committed: list[tuple[MemoryTask, Tensor, int, MemoryKV | None]],
        duration: float,
        done_event: Any,
        stats: dict[int, Any],
    ) -> None:
        """Make the new STMs visible (with the memory keys/values made from them): the next turn
        of each conversation may now be admitted."""
        with self._sched.lock:
            for t, stm, version, kv in committed:
                conv = t.conv
                conv.stm, conv.version, conv.ready_event = stm, version, done_event if t.install is None else None
                conv.memory_kv = kv if t.install is None else None
                if t.install is not None:
                    if t.install.turns is not None:
                        conv.committed_turn = t.install.turns
                        conv.next_turn = max(conv.next_turn, t.install.turns + 1)
                    t.install.done.set()
                else:
                    conv.memory_error = None
                    conv.committed_turn = max(conv.committed_turn, t.turn)
                    record = MemoryRecord("updated", version, duration, None, *stats.get(id(t), ((), ())))
                    settle(conv, t.turn, record)
                    if t.turn > 0:
                        conv.history.append({"turn": t.turn, "memory_update_s": duration, "stm_version": version})
                self._sched.touch(conv)
                self._sched.mark_idle(conv)
            for conv in self._sched.evictable():
                evict(conv)

    def _compute(self, tasks: list[MemoryTask]) -> tuple[list[Tensor], Tensor, Any, list[MemoryKV]]:
        """Encoder + memory attention for a batch of conversations -> each one's own new STM, what
        changed (``memory_change``: (B, 2, L), read once the update has synchronised), and each
        one's memory cross-attention keys/values for its next turn: projected here, in the
        asynchronous phase, rather than when the next query arrives (RxT-Beta: 22 GFLOP a turn)."""
        device = self.device
        lengths = [len(t.ids or ()) for t in tasks]
        ids = torch.full((len(tasks), max(lengths)), self.config.special_tokens.pad_id, dtype=torch.long)
        mask = torch.zeros(len(tasks), max(lengths), dtype=torch.bool)
        for i, t in enumerate(tasks):
            ids[i, : lengths[i]] = torch.tensor(t.ids)
            mask[i, : lengths[i]] = True
        stms = [t.conv.stm for t in tasks]
        gates: list[Tensor] = []
        if self._stream is None:
            old = torch.stack(stms)  # type: ignore[arg-type]
            new = self.model.memory_update(old, ids.to(device), mask.to(device), gates)
            return split(new), memory_change(old, new, gates), None, self._next_kv(new)
        with torch.cuda.stream(self._stream):  # pragma: no cover - GPU only
            for t in tasks:
                if t.conv.ready_event is not None:
                    self._stream.wait_event(t.conv.ready_event)
            # the answer's decode ran on the default stream; the memory stream starts after it
            self._stream.wait_stream(torch.cuda.default_stream(device))
            old = torch.stack(stms)  # type: ignore[arg-type]
            new = self.model.memory_update(
                old, ids.to(device, non_blocking=True), mask.to(device, non_blocking=True), gates
            )
            parts = split(new)
            change = memory_change(old, new, gates)
            kv = self._next_kv(new)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(self._stream)
        return parts, change, done, kv

    def _project(self, conv: ConversationEntry, version: int) -> None:
        """``conv``'s memory keys/values, left on it if its STM is still the one it was opened
        with and no turn has started (a started turn projected them itself). Only while the
        engine has no turn queued or under way: then the cores are the decode thread's, and a
        join projects all its new rows in one batch (a burst of opened conversations would
        otherwise be projected one by one beside the prefill that needs the cores)."""
        with self._sched.lock:
            if self._sched.waiting or self._sched.busy_count:  # (so conv is not busy either)
                return
            stm = conv.stm
            if stm is None or conv.version != version or conv.memory_kv is not None:
                return
        kv = self.model.row_memory_kv(stm)
        with self._sched.lock:
            if conv.stm is stm and conv.version == version and not conv.busy and conv.memory_kv is None:
                conv.memory_kv = kv
                if conv.open:
                    self._sched.touch(conv)

    def _next_kv(self, new: Tensor) -> list[MemoryKV]:
        """Each conversation's memory keys/values for its next turn, projected from its new STM
        alone (:meth:`RxTModel.row_memory_kv`), whichever updates shared this batch."""
        return [self.model.row_memory_kv(row) for row in new]

    # ------------------------------------------------------------------ the store
    def _persist(self, task: MemoryTask, stm: Tensor) -> int | None:
        """Write the new STM (stores own the rules); returns the version to commit, or None if the
        task failed."""
        conv = task.conv
        with self._sched.lock:
            version = conv.version + 1
            turns = max(task.turn, conv.committed_turn)
            if task.install is not None:
                version = max(version, task.install.version or 0)  # a restored snapshot keeps its count
                turns = task.install.turns if task.install.turns is not None else turns
        if self.store is None:
            return version
        try:
            if task.install is not None:  # an explicit overwrite moves past the store
                written = overwrite(self.store, self.config, conv.id, turns, stm, version)
                if written is None:
                    self._fail([task], ConversationError(f"conversation {conv.id!r}: the store keeps moving on"), None)
                return written
            persist(self.store, self.config, conv.id, turns, stm, version)
            return version
        except StaleStateError as exc:  # another worker moved the conversation on: take its memory
            self._adopt(conv, newer_copy(self.store, self.config, conv.id, conv.version))
            self._fail([task], exc, None)
        except Exception as exc:
            error = exc if isinstance(exc, ConversationError) else ModelExecutionError(f"could not store: {exc}")
            self._fail([task], error, exc)
        return None

    def _adopt(self, conv: ConversationEntry, stored: ConversationState | None) -> None:
        """Take the store's newer memory as this conversation's (another worker moved it on)."""
        if stored is None:
            return
        stm = stored.stm.to(self.device, self.model.dtype)
        with self._sched.lock:
            if stored.stm_version > conv.version:
                conv.stm, conv.version, conv.ready_event = stm, stored.stm_version, None
                conv.memory_kv = None
                conv.committed_turn = max(conv.committed_turn, stored.turn)
                conv.next_turn = max(conv.next_turn, stored.turn + 1)
                log.warning("conversation %r re-read memory v%d from the store", conv.id, stored.stm_version)

    def _fail(self, tasks: list[MemoryTask], error: Exception, cause: BaseException | None) -> None:
        """The STM of these conversations stays as it was; their turns report ``error``."""
        if cause is not None and error is not cause:
            error.__cause__ = cause
        log.error("%s", error)
        with self._sched.lock:
            for t in tasks:
                if t.install is not None:
                    t.install.error = error
                    t.install.done.set()
                else:
                    t.conv.memory_error = error
                    settle(t.conv, t.turn, MemoryRecord("failed", t.conv.version, error=error))
                self._sched.mark_idle(t.conv)


class _Writers:
    """Daemon threads that run store writes (not an executor: one refuses work once the
    interpreter starts exiting, and the updates owed at exit must still be written)."""

    def __init__(self, count: int) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"rxrt-store-write-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._jobs.put(lambda: fn(*args))

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def stop(self, timeout: float | None) -> None:
        """Write what was handed over, then end the threads."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)


def evict(conv: ConversationEntry) -> None:
    """Drop an idle conversation's STM from memory (the store holds it; under the lock)."""
    conv.stm = None
    conv.memory_kv = None
    conv.ready_event = None
    conv.history.clear()


def _per_layer(change: Tensor | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(layer_change, layer_gate) of one conversation's (2, L) row; () where unknown."""
    if change is None:
        return (), ()
    moved, gate = change.tolist()
    known = all(math.isfinite(g) for g in gate)
    return tuple(moved), tuple(gate) if known else ()


def split(stm: Tensor) -> list[Tensor]:
    """One owned (L, S, D) tensor per conversation, so a conversation never pins the whole batch."""
    return [stm[0]] if stm.shape[0] == 1 else [s.clone() for s in stm]
