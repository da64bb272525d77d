"""The events of a conversation: frozen, typed records that serialise to msgpack.

Every event carries ``conversation_id`` and ``turn`` (1 for a conversation's first query). One
turn produces, in this order::

    QueryReceived  Token*  AnswerCompleted  MemoryUpdateStarted  MemoryUpdated

or ends early with ``InteractionFailed`` (the STM then keeps its last committed version). The
answer's events come from the decoder; the memory events come from the background update. A
conversation's ``memory_events`` observable repeats the last two for every turn.

``to_dict``/``from_dict`` and ``pack``/``unpack`` give the wire form (a map with a ``type`` tag), so
the same events can cross a socket unchanged. :class:`Mailbox` is how they reach their
subscribers: in order, one at a time, off the engine's threads.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias

import msgpack

log = logging.getLogger(__name__)

FinishReason = Literal["eos", "length", "cancelled", "stop"]  # "stop": a stop sequence (HTTP front)


@dataclass(frozen=True, slots=True)
class EventBase:
    conversation_id: str
    turn: int
    type_name: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = [v.to_list() if isinstance(v, TokenLogprob) else v for v in value]
        return {"type": self.type_name, **data}


@dataclass(frozen=True, slots=True)
class QueryReceived(EventBase):
    """A query entered the conversation (it may still wait for the previous memory update)."""

    query: str
    token_ids: tuple[int, ...]
    type_name: ClassVar[str] = "query_received"


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability under the model at one answer position.

    ``logprob`` is ``log_softmax`` of the model's raw logits (before temperature, top-k and
    top-p: docs/api.md says why). ``text`` is the token's own text (its bytes as UTF-8, U+FFFD
    for bytes of a character it only starts or ends; a special token's name). On a
    ``Token`` event's entry, ``top`` holds the most probable tokens at that position, best first.
    """

    token_id: int
    text: str
    logprob: float
    top: tuple[TokenLogprob, ...] = ()

    def to_list(self) -> list[Any]:
        """The wire form: ``[token_id, text, logprob, [top entries...]]``."""
        return [self.token_id, self.text, self.logprob, [t.to_list() for t in self.top]]

    @classmethod
    def from_list(cls, data: Any) -> TokenLogprob:
        if not isinstance(data, (list, tuple)) or len(data) != 4:
            raise ValueError(f"a token logprob is [token_id, text, logprob, top], got {data!r}")
        token_id, text, logprob, top = data
        return cls(int(token_id), str(text), float(logprob), tuple(cls.from_list(t) for t in top))


@dataclass(frozen=True, slots=True)
class Token(EventBase):
    """One generated token: its id, its text piece and its index in the answer (0-based).

    ``text`` may be empty while a multi-byte character is incomplete; concatenating the pieces of
    a turn always gives ``AnswerCompleted.text`` (a character cut off by the length limit is in
    neither). A slow async consumer may receive several tokens merged
    into one event (``count > 1``; see ``Conversation.astream``).

    ``logprobs``: with the turn option ``logprobs=k``, one entry per token of the event (so
    ``count`` of them), each with its ``k`` most probable alternatives; empty otherwise.
    """

    token_id: int
    text: str
    position: int
    count: int = 1
    logprobs: tuple[TokenLogprob, ...] = ()
    type_name: ClassVar[str] = "token"

    @property
    def logprob(self) -> float | None:
        """The log-probability of this event's (last) token, when the turn asked for them."""
        return self.logprobs[-1].logprob if self.logprobs else None


@dataclass(frozen=True, slots=True)
class AnswerCompleted(EventBase):
    """The answer is done. Timings: ``ttft_s`` from the query entering the engine to the first
    token (queueing included), ``tokens_per_s`` over the decode after the first token."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    ttft_s: float
    tokens_per_s: float
    duration_s: float
    queued_s: float
    type_name: ClassVar[str] = "answer_completed"


@dataclass(frozen=True, slots=True)
class MemoryUpdateStarted(EventBase):
    """Encoder and memory attention began rewriting the STM (version ``stm_version`` is current)."""

    stm_version: int
    type_name: ClassVar[str] = "memory_update_started"


@dataclass(frozen=True, slots=True)
class MemoryUpdated(EventBase):
    """The new STM is committed as ``stm_version``; the next query of this conversation may run.

    What changed, per STM layer (empty where unknown, e.g. from an older sender):
    ``layer_change`` is how far the memory moved, ‖STM_t − STM_t−1‖ / ‖STM_t−1‖, and ``layer_gate``
    how open the residual gates were (their mean value: 0 keeps the old memory, 1 takes the new)."""

    stm_version: int
    duration_s: float
    layer_change: tuple[float, ...] = ()
    layer_gate: tuple[float, ...] = ()
    type_name: ClassVar[str] = "memory_updated"


@dataclass(frozen=True, slots=True)
class InteractionFailed(EventBase):
    """This turn failed; ``stm_version`` is the STM the conversation keeps (unchanged)."""

    error_type: str
    message: str
    stage: Literal["query", "generate", "memory"]
    stm_version: int
    type_name: ClassVar[str] = "interaction_failed"


Event: TypeAlias = QueryReceived | Token | AnswerCompleted | MemoryUpdateStarted | MemoryUpdated | InteractionFailed
MemoryEvent: TypeAlias = MemoryUpdateStarted | MemoryUpdated

EVENT_TYPES: dict[str, type[EventBase]] = {
    cls.type_name: cls
    for cls in (QueryReceived, Token, AnswerCompleted, MemoryUpdateStarted, MemoryUpdated, InteractionFailed)
}


def from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from its wire map; raises ``ValueError`` on an unknown type or bad fields."""
    data = dict(data)
    kind = data.pop("type", None)
    cls = EVENT_TYPES.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown event type {kind!r}; known: {', '.join(EVENT_TYPES)}")
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) - names or {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(data):
        raise ValueError(f"fields {sorted(data)} do not match event {kind!r} ({sorted(names)})")
    for f in dataclasses.fields(cls):
        if f.name in data and isinstance(data[f.name], list):
            data[f.name] = tuple(data[f.name])
    if cls is Token and "logprobs" in data:
        try:
            data["logprobs"] = tuple(TokenLogprob.from_list(item) for item in data["logprobs"])
        except TypeError as exc:
            raise ValueError(f"bad token logprobs: {exc}") from None
    event: Event = cls(**data)  # type: ignore[assignment]
    return event


def pack(event: Event) -> bytes:
    """msgpack bytes of one event."""
    return bytes(msgpack.packb(event.to_dict(), use_bin_type=True))


def unpack(payload: bytes) -> Event:
    data = msgpack.unpackb(payload, raw=False)
    if not isinstance(data, dict):
        raise ValueError("an event must be a msgpack map")
    return from_dict(data)


# ---------------------------------------------------------------------- delivery
class Mailbox:
    """Serial delivery: run callbacks in order, one at a time, off the engine's threads.

    reactivex forbids concurrent ``on_next`` calls to one observer, and a subscriber's callback may be
    slow. The engine therefore never calls user code itself: it posts callbacks to the conversation's
    :class:`Mailbox`, which drains them in FIFO order on a shared thread pool (one drain at a time per
    mailbox). A slow subscriber delays only its own conversation's deliveries; the decode loop keeps
    stepping every other conversation. A mailbox's backlog is bounded by what its own turns produce
    (at most ``max_seq_len`` tokens plus a few control events per turn).
    """

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._queue: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._draining = False
        self._idle = threading.Event()
        self._idle.set()

    def post(self, callback: Callable[[], None], defer: list[Mailbox] | None = None) -> None:
        """Queue ``callback``; it runs after every callback posted before it. Never blocks.

        With ``defer``, a drain this post needs is not started here: the mailbox is appended to
        ``defer`` and the caller must hand the list to :func:`start_drains` (a decode step posts
        one token to every row's mailbox and starts their drains with one hand-off, not one pool
        wake-up per conversation on its own thread)."""
        with self._lock:
            self._queue.append(callback)
            if self._draining:
                return
            self._draining = True
            self._idle.clear()
        if defer is not None:
            defer.append(self)
        else:
            self._start()

    def _start(self) -> None:
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # executor shut down: deliver inline so nothing is lost
            self._drain()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    self._idle.set()
                    return
                callback = self._queue.popleft()
            try:
                callback()
            except Exception:  # a subscriber's bug must not stop delivery to the others
                log.exception("event callback raised")

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until everything posted so far has been delivered."""
        return self._idle.wait(timeout)


def start_drains(mailboxes: Sequence[Mailbox]) -> None:
    """Start the drains that posts with ``defer`` left to the caller, with one pool hand-off.

    One pool task starts every other mailbox's drain, each on its own pool thread as
    :meth:`Mailbox.post` would (so a slow subscriber still delays only its own conversation),
    and drains the first itself: the posting thread (the decode loop) wakes one pool thread per
    step instead of one per conversation."""
    if not mailboxes:
        return
    if len(mailboxes) == 1:
        mailboxes[0]._start()
        return
    boxes = list(mailboxes)
    try:
        boxes[0]._executor.submit(_fan_out, boxes)
    except RuntimeError:  # executor shut down: deliver inline so nothing is lost
        _fan_out(boxes)


def _fan_out(mailboxes: list[Mailbox]) -> None:
    for mailbox in mailboxes[1:]:
        mailbox._start()
    mailboxes[0]._drain()
