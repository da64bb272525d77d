"""The backend protocol: what operators ask of an engine and what it calls back.

This is the narrow, operator-facing contract (not the wire format: that is
:mod:`rxruntime.serving.protocol`). The engine implements :class:`Backend`; a fake one drives
the operators' marble tests, so nothing here may depend on how the engine schedules work.

The engine owns a turn's number and its order: ``next_turn`` hands out the next number of a
conversation, ``start_turn`` runs a turn only after every turn numbered before it, and
``release_turn`` gives back a number whose turn will never start. The operators only carry the
number they were given on the events of that turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rxruntime.events import FinishReason, MemoryEvent, MemoryUpdated, MemoryUpdateStarted, TokenLogprob
from rxruntime.models.sampler import SamplingParams
from rxruntime.models.tokenizer import RxTokenizer


@dataclass(frozen=True)
class TurnRequest:
    """What the ``generate`` operator asks the engine to run."""

    conversation_id: str
    turn: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_new_tokens: int | None = None
    remember_partial: bool = False
    remember: bool = True  # False: no memory update at all (the caller memorizes the text it showed)
    logprobs: int | None = None  # alternatives to report per token (0: the chosen one's); None: nothing


@dataclass(frozen=True)
class AnswerStats:
    ttft_s: float
    tokens_per_s: float
    duration_s: float
    queued_s: float


class TurnListener(Protocol):
    """Decode-stage callbacks of one turn, delivered in order on the conversation's mailbox."""

    def on_token(self, token_id: int, position: int, logprobs: TokenLogprob | None = None) -> None:
        """A sampled token; ``logprobs`` (texts empty: ``detokenize`` fills them) when the turn asked."""

    def on_answer(self, token_ids: tuple[int, ...], finish_reason: FinishReason, stats: AnswerStats) -> None: ...

    def on_error(self, exc: Exception, stm_version: int) -> None: ...


class MemoryListener(Protocol):
    """Memory-stage callbacks of one turn (or of every turn, for ``memory_events``)."""

    def on_memory_started(self, turn: int, stm_version: int) -> None: ...

    def on_memory_updated(
        self,
        turn: int,
        stm_version: int,
        duration_s: float,
        change: tuple[float, ...] = (),
        gate: tuple[float, ...] = (),
    ) -> None: ...

    def on_memory_failed(self, turn: int, exc: Exception, stm_version: int) -> None: ...

    def on_memory_skipped(self, turn: int) -> None: ...


class MemoryEvents:
    """A :class:`MemoryListener` that turns one conversation's memory callbacks into events
    (``MemoryUpdateStarted``, ``MemoryUpdated``) for :meth:`memory_event`. A failed or skipped
    update is no event here: a subclass that must answer one overrides its method."""

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id

    def memory_event(self, event: MemoryEvent) -> None:
        raise NotImplementedError

    def on_memory_started(self, turn: int, stm_version: int) -> None:
        self.memory_event(MemoryUpdateStarted(self.conversation_id, turn, stm_version))

    def on_memory_updated(
        self,
        turn: int,
        stm_version: int,
        duration_s: float,
        change: tuple[float, ...] = (),
        gate: tuple[float, ...] = (),
    ) -> None:
        self.memory_event(MemoryUpdated(self.conversation_id, turn, stm_version, duration_s, change, gate))

    def on_memory_failed(self, turn: int, exc: Exception, stm_version: int) -> None:
        pass

    def on_memory_skipped(self, turn: int) -> None:
        pass


class Backend(Protocol):
    """What operators need from an engine (a fake one drives the marble tests).

    Turn numbers order a conversation's turns: ``next_turn`` reserves one, ``start_turn`` runs it
    after every turn reserved before it has started (or been released), whichever thread calls
    first; ``release_turn`` gives up a reservation that will never start (a no-op once started).
    """

    tokenizer: RxTokenizer
    max_seq_len: int
    vocab_size: int
    default_sampling: SamplingParams

    def next_turn(self, conversation_id: str) -> int: ...

    def release_turn(self, conversation_id: str, turn: int) -> None: ...

    def start_turn(self, request: TurnRequest, listener: TurnListener) -> Callable[[], None]: ...

    def watch_memory(self, conversation_id: str, turn: int, listener: MemoryListener) -> Callable[[], None]: ...

    def stm_version(self, conversation_id: str) -> int: ...


class ConversationRef(Protocol):
    """What an operator needs to know about a conversation: its id and the backend running it."""

    @property
    def id(self) -> str: ...

    @property
    def backend(self) -> Backend: ...
