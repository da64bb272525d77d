"""The decode loop: continuous batching of every conversation's answers on one thread.

Turns the scheduler admits join the decode batch (one batched prefill) and leave it on
``[EOS]``, the length limit or cancellation, between decode steps; each row reads its own
conversation's STM through memory cross-attention. A finished answer is handed to the memory
worker (always, whether or not anyone still listens, so a turn is never silently dropped);
memory-only and install jobs go to it directly.

A failure that belongs to one row fails only that turn: a conversation whose STM holds NaN or
infinite values is refused before the prefill; a prefill that raises is retried one turn at a
time; a row whose sampler raises or whose logits are not finite leaves the batch with its error
while the other rows carry on. Only a decode step that raises as a whole fails the whole batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from rxruntime.backend import AnswerStats
from rxruntime.errors import EngineClosedError, ModelExecutionError
from rxruntime.events import FinishReason, Mailbox, TokenLogprob, start_drains
from rxruntime.models.generation import DecodeBatch, JoinRequest
from rxruntime.models.openmp import release_idle_threads
from rxruntime.models.rxt import RxTModel
from rxruntime.models.sampler import StepLogprobs

from .memory_worker import MemoryWorker
from .scheduler import Job, MemoryRecord, MemoryTask, Scheduler, set_record

log = logging.getLogger(__name__)


class DecodeLoop:
    def __init__(self, model: RxTModel, scheduler: Scheduler, memory: MemoryWorker, *, max_batch: int) -> None:
        self.model = model
        self.config = model.config
        self.device = model.device
        self.batch = DecodeBatch(model, capacity=max_batch)
        self._sched = scheduler
        self._memory = memory
        self._jobs: dict[int, Job] = {}  # decode-batch key -> job
        self._thread = threading.Thread(target=self._loop, name="rxrt-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def active(self) -> int:
        return self.batch.size

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        lock = self._sched.lock
        with torch.inference_mode():
            while True:
                with lock:
                    released = False
                    while not self._sched.closed and self.batch.size == 0 and not self._sched.admissible():
                        if not released:  # idle: its OpenMP team would slow the memory thread's
                            release_idle_threads()
                            released = True
                        lock.wait(self._sched.held_for())  # a hold that lapses lets its turns in
                    if self._sched.closed:
                        self._fail_everything(EngineClosedError("the engine was closed"))
                        return
                    joining, memory_only = self._sched.admit(self.batch.capacity - self.batch.size)
                    for job in memory_only:
                        job.admitted = time.perf_counter()
                        self._memory.enqueue(MemoryTask(job.conv, job.request.turn, job.memory_ids, job.install))
                if joining:
                    self._join(joining)
                if self.batch.size:
                    self._step()

    def _join(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.admitted = now
        stms = [job.conv.stm for job in jobs]
        if any(stm is None for stm in stms):  # cannot happen: an admitted conversation is resident
            self._fail([j for j, s in zip(jobs, stms) if s is None], ModelExecutionError("memory not loaded"))
            jobs = [j for j, s in zip(jobs, stms) if s is not None]
        if not jobs:
            return
        finite = all_finite([job.conv.stm for job in jobs])  # type: ignore[misc]
        broken = [job for job, ok in zip(jobs, finite) if not ok]
        if broken:
            self._fail(broken, ModelExecutionError("the conversation's memory holds NaN or infinite values"))
            jobs = [job for job, ok in zip(jobs, finite) if ok]
        try:
            self._prefill(jobs)
        except Exception as exc:
            if len(jobs) == 1:
                self._fail(jobs, ModelExecutionError(f"prefill failed: {exc}"), cause=exc)
                return
            for job in jobs:  # find the turn that fails; the others start
                try:
                    self._prefill([job])
                except Exception as single:
                    self._fail([job], ModelExecutionError(f"prefill failed: {single}"), cause=single)

    def _prefill(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        requests = []
        for job in jobs:
            stm = job.conv.stm
            assert stm is not None
            if job.conv.ready_event is not None:  # GPU: wait on the memory stream, not the host
                torch.cuda.current_stream(self.device).wait_event(job.conv.ready_event)
                stm.record_stream(torch.cuda.current_stream(self.device))
            request = job.request
            kv, job.conv.memory_kv = job.conv.memory_kv, None  # made with this STM by its memory update; used once
            requests.append(
                JoinRequest(id(job), request.prompt_ids, stm, request.params, job.seed, request.logprobs, kv)
            )
        first = self.batch.join(requests).tolist()
        failed, scores = dict(self.batch.failed), self.batch.logprobs
        for job in jobs:
            self._jobs[id(job)] = job
        drains: list[Mailbox] = []
        now = time.perf_counter()
        try:
            for job, token in zip(jobs, first):
                self._on_sampled(job, token, failed, drains, now, scores.get(id(job)))
        finally:
            start_drains(drains)

    def _step(self) -> None:
        keys = list(self.batch.keys)
        try:
            tokens = self.batch.step().tolist()
        except Exception as exc:
            jobs = [self._jobs.pop(k) for k in keys]  # type: ignore[call-overload]
            for key in keys:
                self.batch.leave(key)
            self._fail(jobs, ModelExecutionError(f"decode step failed: {exc}"), cause=exc, leave=False)
            return
        failed, scores = dict(self.batch.failed), self.batch.logprobs
        drains: list[Mailbox] = []  # the step's token events start their deliveries together
        now = time.perf_counter()  # one clock read for the step's rows: they share its token time
        try:
            for key, token in zip(keys, tokens):
                self._on_sampled(self._jobs[key], token, failed, drains, now, scores.get(key))  # type: ignore[index]
        finally:
            start_drains(drains)

    def _on_sampled(
        self,
        job: Job,
        token: int,
        failed: dict[object, BaseException],
        drains: list[Mailbox],
        now: float,
        scores: StepLogprobs | None = None,
    ) -> None:
        if job.first_token is None:
            job.first_token = now
        if token < 0:  # this row alone failed
            cause = failed.get(id(job))
            message = f"sampling failed: {cause}" if cause is not None else "the logits are not finite"
            self._fail([job], ModelExecutionError(message), cause=cause)
            return
        if job.cancelled:
            self._finish(job, "cancelled")
            return
        if token == self.config.special_tokens.eos_id:
            self._finish(job, "eos")
            return
        position = len(job.tokens)
        job.tokens.append(token)
        listener = job.listener
        if scores is None:
            job.conv.mailbox.post(lambda: listener.on_token(token, position), drains)
        else:
            top = tuple(TokenLogprob(i, "", lp) for i, lp in scores.top)
            logprob = TokenLogprob(token, "", scores.logprob, top)
            job.conv.mailbox.post(lambda: listener.on_token(token, position, logprob), drains)
        if len(job.tokens) >= job.limit:
            self._finish(job, "length")

    def _finish(self, job: Job, reason: FinishReason) -> None:
        self.batch.leave(id(job))
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
        remember = job.request.remember and (reason != "cancelled" or (job.request.remember_partial and bool(tokens)))
        with self._sched.lock:
            job.phase = "done"
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
                closed = reason == "eos" or self.config.eos_after_truncated_answer
                ids = [*job.request.prompt_ids, *tokens, *([self.config.special_tokens.eos_id] if closed else [])]
                self._memory.enqueue(MemoryTask(conv, turn, ids))
            else:
                set_record(conv, turn, MemoryRecord("skipped", conv.version))
                self._sched.mark_idle(conv)

    def _fail(
        self, jobs: Sequence[Job], exc: Exception, cause: BaseException | None = None, leave: bool = True
    ) -> None:
        if cause is not None:
            exc.__cause__ = cause
        log.error("turns failed: %s", exc)
        with self._sched.lock:
            for job in jobs:
                if leave and id(job) in self.batch.keys:
                    self.batch.leave(id(job))
                self._jobs.pop(id(job), None)
                job.phase = "done"
                listener = job.listener
                job.conv.mailbox.post(lambda listener=listener, v=job.conv.version: listener.on_error(exc, v))  # type: ignore[misc]
                self._sched.mark_idle(job.conv)

    def _fail_everything(self, exc: Exception) -> None:
        """The engine closed (under the lock): queued and running turns fail with ``exc``."""
        self._sched.fail_waiting(exc)
        active = list(self._jobs.values())
        self._jobs.clear()
        for job in active:
            job.phase = "done"
            listener = job.listener
            job.conv.mailbox.post(lambda listener=listener, v=job.conv.version: listener.on_error(exc, v))  # type: ignore[misc]
            self._sched.mark_idle(job.conv)


def all_finite(tensors: Sequence[Tensor]) -> list[bool]:
    """Whether each tensor holds only finite values. Its sum is finite iff they all are (a NaN
    or an infinity carries into it), unless finite values overflowed the sum, which the exact
    check then settles: one pass, no copy, one device sync. (A stack of a burst's STMs for one
    ``isfinite`` was 200 MB to copy and 0.35 s at 64 alpha-mini conversations.)"""
    if not tensors:
        return []
    sums = torch.isfinite(torch.stack([t.sum() for t in tensors])).tolist()
    return [ok or bool(torch.isfinite(t).all()) for ok, t in zip(sums, tensors)]
