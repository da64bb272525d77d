"""A conversation: the user's handle on one STM and its sequence of turns.

``interact`` returns a cold reactivex Observable of the turn's events (subscribing sends the query;
disposing before the answer completes cancels it); ``astream`` gives the same events to async code;
``ask`` blocks for the answer's text. Queries of one conversation run in order, each after the
previous turn's memory update has committed; sending one early simply queues it.

The stream of one turn completes after ``MemoryUpdated``. Leaving earlier (e.g. after
``AnswerCompleted``) is fine: the memory update still runs and its events go to ``memory_events``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import reactivex
import torch
from reactivex import Observable
from reactivex.disposable import SingleAssignmentDisposable
from reactivex.subject import Subject
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from rxruntime.engine.options import check_options
from rxruntime.errors import ConversationError
from rxruntime.events import AnswerCompleted, Event, MemoryEvent, MemoryUpdated, MemoryUpdateStarted
from rxruntime.models.config import RxTConfig
from rxruntime.operators import interaction
from rxruntime.operators.tokenize import Query
from rxruntime.streams import DONE, EventBuffer, OverflowPolicy, Waker

if TYPE_CHECKING:
    from rxruntime.engine import Engine

_STATE_FORMAT = "rxruntime.conversation-state/1"
# Versions and turn counts must stay exact in every store (Redis compares them as doubles) with
# room to grow, so a snapshot's counters may not exceed this.
MAX_COUNTER = 2**52


def config_fingerprint(config: RxTConfig) -> str:
    """Identifies the model a snapshot belongs to (a different model cannot read it).

    Only the fields that differ from their defaults are hashed, so a release that adds a config
    field (with a default that keeps the old behaviour) does not orphan every stored memory."""
    canonical = json.dumps(_non_default(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _non_default(obj: Any) -> dict[str, Any]:
    """The dataclass's fields that differ from their defaults, nested configs recursively."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            nested = _non_default(value)
            if nested:
                out[f.name] = nested
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            out[f.name] = value
            continue
        if value != default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class ConversationState:
    """A snapshot of a conversation's memory: the STM (L, S, D) on the CPU and where it stands."""

    conversation_id: str
    turn: int
    stm_version: int
    stm: Tensor
    config_fingerprint: str

    def check_fits(self, config: RxTConfig) -> None:
        """Refuse a snapshot this model cannot use or a store cannot hold (ConversationError)."""
        if not isinstance(self.stm, Tensor):
            raise ConversationError("the STM snapshot holds no tensor")
        expected = (config.num_layers, config.stm_size, config.dim)
        if tuple(self.stm.shape) != expected:
            raise ConversationError(f"STM snapshot has shape {tuple(self.stm.shape)}, this model needs {expected}")
        if self.config_fingerprint != config_fingerprint(config):
            raise ConversationError(
                "the STM snapshot was taken with a different model configuration; it cannot be restored here"
            )
        if not self.stm.dtype.is_floating_point:
            raise ConversationError(f"the STM snapshot holds {self.stm.dtype} values, not floating point")
        if not bool(torch.isfinite(self.stm).all()):
            raise ConversationError("the STM snapshot holds NaN or infinite values")
        for name in ("stm_version", "turn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
                raise ConversationError(f"the snapshot's {name} {value!r} is not an integer in [0, 2**52]")
        if not isinstance(self.conversation_id, str) or not self.conversation_id:
            raise ConversationError("the snapshot's conversation_id must be a non-empty string")

    def to_bytes(self) -> bytes:
        meta = {
            "format": _STATE_FORMAT,
            "conversation_id": self.conversation_id,
            "turn": str(self.turn),
            "stm_version": str(self.stm_version),
            "config_fingerprint": self.config_fingerprint,
        }
        return bytes(st_save({"stm": self.stm.contiguous()}, metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes) -> ConversationState:
        try:
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
            tensors = st_load(data)
        except Exception as exc:
            raise ConversationError(f"not a conversation state snapshot ({exc})") from exc
        if meta.get("format") != _STATE_FORMAT or "stm" not in tensors:
            raise ConversationError("not a conversation state snapshot (wrong format tag)")
        try:
            return cls(
                conversation_id=str(meta["conversation_id"]),
                turn=int(meta["turn"]),
                stm_version=int(meta["stm_version"]),
                stm=tensors["stm"],
                config_fingerprint=str(meta["config_fingerprint"]),
            )
        except (KeyError, ValueError) as exc:
            raise ConversationError(f"not a conversation state snapshot (bad metadata: {exc})") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> ConversationState:
        path = Path(path)
        if not path.is_file():
            raise ConversationError(f"{path}: no such state file")
        try:
            return cls.from_bytes(path.read_bytes())
        except ConversationError as exc:
            raise ConversationError(f"{path}: {exc}") from exc


class TurnMethods(ABC):
    """``astream`` and ``ask`` for anything with an ``interact`` (a local or a remote conversation)."""

    @abstractmethod
    def interact(self, query: Query, **options: Any) -> Observable[Event]: ...

    async def astream(
        self, query: Query, *, buffer: int = 64, overflow: OverflowPolicy = "coalesce", **options: Any
    ) -> AsyncIterator[Event]:
        """The events of one turn for asyncio/trio code. Leaving the loop or cancelling the task
        cancels the turn if its answer is not complete yet. At most ``buffer`` token events wait
        for a slow consumer (see :mod:`rxruntime.streams` for the ``overflow`` policies)."""
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

    def __init__(self, engine: Engine, conversation_id: str) -> None:
        self._engine = engine
        self._id = conversation_id
        self._memory_subject: Subject[MemoryEvent] = Subject()
        self._unsubscribe = engine.subscribe_memory(conversation_id, _MemoryForwarder(self))

    @property
    def id(self) -> str:
        return self._id

    @property
    def backend(self) -> Engine:
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
        ``thinking_mode`` (``fast`` or, for a ``beta`` model, ``extended``: see docs/models.md).
        Each is checked here: a bad name or value raises InvalidOptionError naming it.
        """
        check_options(
            self._engine.default_sampling, self._engine.vocab_size, options, self._engine.tokenizer.interaction_template
        )
        return reactivex.of(query).pipe(interaction(self, **options))

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


class _MemoryForwarder:
    """Engine memory callbacks -> the conversation's ``memory_events`` subject (on its mailbox)."""

    def __init__(self, conv: Conversation) -> None:
        self._conv = conv

    def on_memory_started(self, turn: int, stm_version: int) -> None:
        self._conv._memory_subject.on_next(MemoryUpdateStarted(self._conv.id, turn, stm_version))

    def on_memory_updated(self, turn: int, stm_version: int, duration_s: float) -> None:
        self._conv._memory_subject.on_next(MemoryUpdated(self._conv.id, turn, stm_version, duration_s))

    def on_memory_failed(self, turn: int, exc: BaseException, stm_version: int) -> None:
        pass  # the turn's own stream reports failures; memory_events stays alive for later turns

    def on_memory_skipped(self, turn: int) -> None:
        pass
