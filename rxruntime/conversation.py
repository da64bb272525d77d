"""A conversation: the user's handle on one STM and its sequence of turns.

``interact`` returns a cold reactivex Observable of the turn's events (subscribing sends the query;
disposing before the answer completes cancels it); ``astream`` gives the same events to async code;
``ask`` blocks for the answer's text. Queries of one conversation run in order, each after the
previous turn's memory update has committed; sending one early simply queues it.

The stream of one turn completes after ``MemoryUpdated``. Leaving earlier (e.g. after
``AnswerCompleted``) is fine: the memory update still runs and its events go to ``memory_events``.

A handle runs each query through the operators' pipeline (:mod:`rxruntime.operators`) and asks
the rest of its engine only what :class:`ConversationHost` names, so this module sits below the
engine that hands handles out. :class:`EventBuffer` (at the end) feeds ``astream``'s consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, Protocol

import anyio
import reactivex
from reactivex import Observable
from reactivex.disposable import SingleAssignmentDisposable
from reactivex.subject import Subject
from torch import Tensor

from rxruntime.backend import Backend, MemoryEvents, MemoryListener
from rxruntime.errors import ConversationError, StreamOverflowError
from rxruntime.events import AnswerCompleted, Event, MemoryEvent, Token
from rxruntime.models.config import RxTConfig
from rxruntime.operators.interaction import Query, turn_pipeline
from rxruntime.options import check_options
from rxruntime.snapshot import ConversationState, config_fingerprint
from rxruntime.stores import STMStore

OverflowPolicy = Literal["coalesce", "error"]


class ConversationHost(Backend, Protocol):
    """What a :class:`Conversation` handle asks of the engine that runs it (beyond the operators'
    :class:`~rxruntime.backend.Backend`): the conversation's lifecycle and memory. The
    :class:`~rxruntime.engine.Engine` is one; the handle never needs to know more of it."""

    config: RxTConfig
    store: STMStore | None
    max_turns_per_conversation: int

    def subscribe_memory(self, conversation_id: str, listener: MemoryListener) -> Callable[[], None]: ...

    def memory_error(self, conversation_id: str) -> Exception | None: ...

    def memorize(
        self, conversation_id: str, interactions: Sequence[tuple[str, str]], timeout: float | None = None
    ) -> int: ...

    def wait_idle(self, conversation_id: str, timeout: float | None = None) -> bool: ...

    def snapshot(self, conversation_id: str) -> tuple[Tensor, int, int]: ...

    def load_state(self, conversation_id: str, state: ConversationState) -> None: ...

    def reset(self, conversation_id: str, memory_init: str | None = None, seed: int | None = None) -> None: ...

    def history(self, conversation_id: str) -> list[dict[str, float | int | str]]: ...

    def close_conversation(self, conversation_id: str) -> None: ...

    def delete_conversation(self, conversation_id: str) -> None: ...


class TurnMethods(ABC):
    """``astream`` and ``ask`` for anything with an ``interact`` (a local or a remote conversation)."""

    @abstractmethod
    def interact(self, query: Query, **options: Any) -> Observable[Event]: ...

    async def astream(
        self, query: Query, *, buffer: int = 64, overflow: OverflowPolicy = "coalesce", **options: Any
    ) -> AsyncIterator[Event]:
        """The events of one turn for asyncio/trio code. Leaving the loop or cancelling the task
        cancels the turn if its answer is not complete yet. At most ``buffer`` token events wait
        for a slow consumer (see :class:`EventBuffer` for the ``overflow`` policies)."""
        waker = Waker()
        subscription = SingleAssignmentDisposable()
        buf = EventBuffer(buffer, overflow, waker, on_overflow=subscription.dispose)
        subscription.disposable = self.interact(query, **options).subscribe(buf.on_next, buf.on_error, buf.on_completed)
        try:
            while True:
                armed = waker.arm()
                item = buf.pop()
                if item is None:
                    await armed.wait()
                    continue
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            subscription.dispose()

    def ask(self, query: Query, timeout: float | None = None, *, wait_for_memory: bool = False, **options: Any) -> str:
        """Send a query and block until its answer is complete; returns the answer text.

        The memory update continues in the background; the next query waits for it. With
        ``wait_for_memory=True``, returns only once that update has committed, and raises its
        error if it failed (the answer was given, but the memory did not take it in).
        """
        done = threading.Event()
        result: dict[str, Any] = {}

        def on_next(event: Event) -> None:
            if isinstance(event, AnswerCompleted):
                result["answer"] = event.text
                if not wait_for_memory:
                    done.set()

        def on_error(exc: Exception) -> None:
            if "answer" in result and not wait_for_memory:
                return  # a memory failure after the answer: ask has returned (or is returning) it
            result["error"] = exc
            done.set()

        subscription = self.interact(query, **options).subscribe(on_next, on_error, done.set)
        try:
            if not done.wait(timeout):
                subscription.dispose()
                raise TimeoutError(f"no answer within {timeout} s")
        except BaseException:  # KeyboardInterrupt too: stop the turn, then re-raise
            subscription.dispose()
            raise
        if "error" in result:
            raise result["error"]
        if "answer" not in result:  # completed without an answer: only if cancelled elsewhere
            raise ConversationError("the turn ended without an answer")
        return str(result["answer"])


class Conversation(TurnMethods):
    """One conversation on an :class:`~rxruntime.engine.Engine`. Cheap handle; state lives in the engine."""

    def __init__(self, engine: ConversationHost, conversation_id: str) -> None:
        self._engine = engine
        self._id = conversation_id
        self._memory_subject: Subject[MemoryEvent] = Subject()
        self._unsubscribe = engine.subscribe_memory(conversation_id, _MemoryForwarder(self))

    @property
    def id(self) -> str:
        return self._id

    @property
    def backend(self) -> ConversationHost:
        return self._engine

    @property
    def stm_version(self) -> int:
        """Version of the last committed STM (0 for a fresh memory; +1 per memory update)."""
        return self._engine.stm_version(self._id)

    @property
    def memory_events(self) -> Observable[MemoryEvent]:
        """A hot Observable of ``MemoryUpdateStarted`` / ``MemoryUpdated`` for every turn."""
        return self._memory_subject

    @property
    def memory_error(self) -> Exception | None:
        """Why this conversation's last memory update failed, or None if it committed.

        ``ask`` returns at the answer; this (or ``ask(..., wait_for_memory=True)``) tells whether
        the memory then took the turn in."""
        return self._engine.memory_error(self._id)

    # ------------------------------------------------------------------ turns
    def interact(self, query: Query, **options: Any) -> Observable[Event]:
        """The events of one turn (cold: subscribing sends the query).

        Options: ``temperature``, ``top_k``, ``top_p``, ``seed``, ``max_new_tokens``,
        ``remember_partial`` (write a cancelled turn's partial answer to memory; default False),
        ``remember`` (False: write no answer to memory, the caller ``memorize``s its own text),
        ``thinking_mode`` (``fast`` or, for a ``beta`` model, ``extended``: see docs/models.md),
        ``logprobs`` (0 to 20: each ``Token`` carries its log-probability and that many
        alternatives, ``Token.logprobs``; None, the default, reports nothing and costs nothing).
        Each is checked here: a bad name or value raises InvalidOptionError naming it.
        """
        checked = check_options(
            self._engine.default_sampling, self._engine.vocab_size, options, self._engine.tokenizer.interaction_template
        )
        return reactivex.of(query).pipe(turn_pipeline(self, checked))

    # ------------------------------------------------------------------ memory
    def memorize(self, query: str, answer: str, timeout: float | None = None) -> int:
        """Write one past interaction to memory without decoding; returns the new STM version.

        The encoder and memory attention read ``[BOS][Q] query [A] answer [EOS]`` exactly as after
        a normal turn: it is a turn of its own (the next turn number), queued in order with the
        others, and its MemoryUpdateStarted / MemoryUpdated reach ``memory_events``. Blocks until
        it has committed; raises what made it fail (the STM then keeps its last version)."""
        return self._engine.memorize(self._id, [(query, answer)], timeout)

    def replay(self, interactions: Sequence[tuple[str, str]], timeout: float | None = None) -> int:
        """:meth:`memorize` each ``(query, answer)`` pair in order (e.g. a chat history before
        the next query); returns the STM version after the last. Stops at the first failure and
        raises it: the pairs after it are not written. At most ``max_turns_per_conversation``
        pairs per call (QueueFullError beyond: replay a long history in chunks)."""
        return self._engine.memorize(self._id, list(interactions), timeout)

    def wait_for_memory(self, timeout: float | None = None) -> bool:
        """Block until no turn is queued or running and the memory update has committed."""
        return self._engine.wait_idle(self._id, timeout)

    def export_state(self, wait: bool = True) -> ConversationState:
        """Snapshot the STM; with ``wait`` (default) after pending turns and memory updates."""
        if wait:
            self.wait_for_memory()
        stm, version, turn = self._engine.snapshot(self._id)
        return ConversationState(self._id, turn, version, stm, config_fingerprint(self._engine.config))

    def load_state(self, state: ConversationState) -> None:
        """Replace this conversation's STM with a snapshot (after pending turns)."""
        self._engine.load_state(self._id, state)

    def reset(self, memory_init: str | None = None) -> None:
        """Forget everything: a fresh random STM, optionally pre-read from ``memory_init``."""
        self._engine.reset(self._id, memory_init)

    def history(self) -> list[dict[str, float | int | str]]:
        """Per-turn statistics: TTFT, tokens/s, queueing, memory-update time, STM version."""
        return self._engine.history(self._id)

    def close(self) -> None:
        """Remove the conversation from the engine; its memory is gone unless exported first."""
        self._unsubscribe()
        self._memory_subject.on_completed()
        self._engine.close_conversation(self._id)

    def delete(self) -> None:
        """Close the conversation and delete its memory from the engine's store."""
        self._unsubscribe()
        self._memory_subject.on_completed()
        self._engine.delete_conversation(self._id)

    def __repr__(self) -> str:
        return f"Conversation(id={self._id!r})"


class _MemoryForwarder(MemoryEvents):
    """Engine memory callbacks -> the conversation's ``memory_events`` subject (on its mailbox).
    Failures are not forwarded: the turn's own stream reports them, and ``memory_events`` stays
    alive for later turns."""

    def __init__(self, conv: Conversation) -> None:
        super().__init__(conv.id)
        self._conv = conv

    def memory_event(self, event: MemoryEvent) -> None:
        self._conv._memory_subject.on_next(event)


# ---------------------------------------------------------------------- async consumers (astream)
class _Done:
    pass


DONE = _Done()


class Waker:
    """Lets a foreign thread wake a task of the current event loop without blocking."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._call_soon: Callable[[Callable[[], None]], object]
        try:
            self._call_soon = asyncio.get_running_loop().call_soon_threadsafe
        except RuntimeError:  # not asyncio: trio (anyio's other backend)
            import trio  # type: ignore[import-not-found,unused-ignore]  # selenium (test extra) installs it

            self._call_soon = trio.lowlevel.current_trio_token().run_sync_soon

    def arm(self) -> anyio.Event:
        """A fresh event to wait on; arm *before* checking for work, so no wake-up is lost."""
        self._event = anyio.Event()
        return self._event

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._call_soon(lambda: self._event.set())


class EventBuffer:
    """A bounded, thread-safe event buffer that feeds an async consumer (``Conversation.astream``).

    Events arrive on a delivery thread; the consumer runs in an asyncio or trio event loop. The
    buffer never blocks the producer and never grows without bound:

    * ``overflow="coalesce"`` (default): when ``size`` events are waiting, a new ``Token`` is merged
      into the newest waiting ``Token`` of the same turn (texts and ``logprobs`` concatenated,
      ``count`` summed), so a slow consumer receives fewer, larger pieces but every character (and
      every token's log-probability), in order. Other events are never dropped or merged (at most a
      few per turn).
    * ``overflow="error"``: the consumer gets :class:`~rxruntime.errors.StreamOverflowError` once the
      waiting events are drained, and the turn is cancelled.

    An anyio memory object stream cannot merge items already queued and cannot be fed from a foreign
    thread without blocking it, hence this small deque with a loop-safe wake-up.
    """

    def __init__(self, size: int, overflow: OverflowPolicy, waker: Waker, on_overflow: Callable[[], None]) -> None:
        if size < 1:
            raise ValueError(f"buffer size must be >= 1, got {size}")
        if overflow not in ("coalesce", "error"):
            raise ValueError(f"overflow must be 'coalesce' or 'error', got {overflow!r}")
        self._items: deque[Event | BaseException | _Done] = deque()
        self._lock = threading.Lock()
        self._size = size
        self._overflow = overflow
        self._waker = waker
        self._on_overflow = on_overflow
        self._stopped = False
        self.merged = 0  # how many tokens were merged into others (for diagnostics)

    def on_next(self, event: Event) -> None:
        overflowed = False
        with self._lock:
            if self._stopped:
                return
            tokens = sum(1 for i in self._items if isinstance(i, Token))
            if isinstance(event, Token) and tokens >= self._size:
                last = self._items[-1] if self._items else None
                if self._overflow == "coalesce" and isinstance(last, Token) and last.turn == event.turn:
                    self._items[-1] = dataclasses.replace(
                        event,
                        text=last.text + event.text,
                        count=last.count + event.count,
                        logprobs=last.logprobs + event.logprobs,
                    )
                    self.merged += event.count
                elif self._overflow == "error":
                    self._items.append(StreamOverflowError(f"the consumer fell {self._size} tokens behind"))
                    self._stopped = overflowed = True
                else:
                    self._items.append(event)
            else:
                self._items.append(event)
        self._waker.wake()
        if overflowed:
            self._on_overflow()

    def on_error(self, exc: Exception) -> None:
        self._finish(exc)

    def on_completed(self) -> None:
        self._finish(DONE)

    def _finish(self, item: BaseException | _Done) -> None:
        with self._lock:
            if self._stopped:
                return
            self._items.append(item)
            self._stopped = True
        self._waker.wake()

    def pop(self) -> Event | BaseException | _Done | None:
        """The oldest waiting item, or None when nothing is waiting."""
        with self._lock:
            return self._items.popleft() if self._items else None


# ConversationState and config_fingerprint live in rxruntime.snapshot; a conversation hands them out
# (export_state), so they stay importable from here too.
__all__ = [
    "Conversation",
    "ConversationHost",
    "ConversationState",
    "EventBuffer",
    "OverflowPolicy",
    "TurnMethods",
    "Waker",
    "config_fingerprint",
]
