"""One turn of a conversation, driven from a request handler.

``start`` sends the query and waits for the first token (or an early end): every error that can
stop a turn before it answers (query too long, queue full, engine closed, conversation gone) is
known by then, so it becomes a proper HTTP status instead of a broken 200 stream. ``events`` then
gives the turn's events, the ones read ahead first.

Closing the turn (``aclose``, or the handler's task being cancelled because the client went away)
disposes the engine subscription: an answer still being decoded is cancelled within one decode
step, while a completed answer's memory update still commits (the engine always finishes it).

A turn with stop sequences (``stops.py``) runs with ``remember=False``: the engine writes nothing,
and once the answer ends (at a stop sequence, which cancels the decoding, or by itself) the turn
``memorize``s exactly the text the client was shown; that write's memory events are reported as
this turn's. A ``thinking_mode="extended"`` turn's tokens before the model's ``[A]`` come out as
:class:`Reasoning` pieces, never mixed into the answer's text.

With the ``logprobs`` option each answer ``Token`` carries its tokens' log-probabilities. Under a
stop sequence a token is reported only once its text has been shown: while the matcher holds it
back it waits, and at a match the tokens that start before the cut are reported (one that the
cut falls inside too: part of it was shown) and those that start at or after it never are. The
yielded ``Token.logprobs`` are the entries released at that point, and ``offsets`` says where
each reported token's text starts in the answer (tokens that a slow reader got merged into one
event share its start).

Streamed, a turn goes out as server-sent events (``sse``, ``sse_response``): a few lines of our
own rather than a dependency. An event is ``event: NAME`` (optional) and one ``data:`` line of
compact JSON, then a blank line. Starlette's ``StreamingResponse`` cancels the generator when the
client disconnects, which is what cancels the turn.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from starlette.responses import StreamingResponse

from rxruntime.conversation import Conversation
from rxruntime.events import (
    AnswerCompleted,
    Event,
    InteractionFailed,
    MemoryEvent,
    MemoryUpdated,
    MemoryUpdateStarted,
    QueryReceived,
    Token,
    TokenLogprob,
)
from rxruntime.serving.http.errors import from_engine_error
from rxruntime.serving.http.metrics import Metrics
from rxruntime.serving.http.stops import StopMatcher

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class TurnSummary:
    """What a response reports about a finished answer."""

    turn: int
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    reasoning: str = ""
    reasoning_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # the reported tokens', when the request asked
    offsets: tuple[int, ...] = ()  # where each reported token's text starts in ``text``


@dataclass(frozen=True)
class Reasoning:
    """A piece of an extended-thinking turn's thinking text (before the model's ``[A]``)."""

    text: str


TurnEvent = Event | Reasoning


class Turn:
    def __init__(
        self,
        conv: Conversation,
        query: str,
        options: dict[str, Any],
        metrics: Metrics,
        param: str,
        stop: tuple[str, ...] = (),
    ) -> None:
        self._conv = conv
        self._query = query
        self._stop = StopMatcher(stop) if stop else None
        self._options = {**options, "remember": False} if stop else options
        self._metrics = metrics
        self._param = param
        self._thinking = options.get("thinking_mode") == "extended"
        self._answer_id = conv.backend.tokenizer.special.answer_id if self._thinking else -1
        self._reasoning: list[str] = []
        self._reasoning_tokens = 0
        self._shown: list[str] = []
        self._stream: AsyncIterator[Event] | None = None
        self._ahead: list[Event] = []
        self.input_tokens = 0
        self.number = 0  # the turn's number in its conversation, known once the query is received
        self.answer: AnswerCompleted | None = None
        self.memory_committed = False
        self._closed = False
        self._failed = False
        self._seen_tokens = 0
        self._last_token: float | None = None
        self._decoded = 0  # characters of answer text decoded so far (before the stop matcher)
        self._pending: list[tuple[TokenLogprob, int, int]] = []  # (entry, start, end): not yet shown
        self.logprobs: list[TokenLogprob] = []  # every token reported so far
        self.offsets: list[int] = []  # where each of them starts in the answer text

    @property
    def memorizes(self) -> bool:
        """Whether the turn itself writes its answer to memory (stop sequences): read it to the end."""
        return self._stop is not None

    async def start(self) -> None:
        """Send the query; return at the first token or answer, raise an APIError if it fails first."""
        self._stream = self._conv.astream(self._query, buffer=256, **self._options)
        try:
            async for event in self._stream:
                self._see(event)
                self._ahead.append(event)
                if isinstance(event, (Token, AnswerCompleted)):
                    return
            raise RuntimeError("the turn ended without an answer")
        except BaseException as exc:
            self._failed = True
            await self.aclose()
            if isinstance(exc, Exception):
                raise from_engine_error(exc, self._param) from exc
            raise

    async def events(self) -> AsyncIterator[TurnEvent]:
        """The turn's events after ``start``: tokens, the answer, then the memory events."""
        async for event in self._raw():
            if isinstance(event, Token):
                if self._thinking:
                    if event.token_id == self._answer_id:
                        self._thinking = False
                    else:
                        self._reasoning_tokens += event.count
                        if event.text:
                            self._reasoning.append(event.text)
                            yield Reasoning(event.text)
                    continue
                start = self._decoded
                self._decoded += len(event.text)
                if self._stop is None:
                    self._shown.append(event.text)
                    self._report([(entry, start, self._decoded) for entry in event.logprobs])
                    yield event
                    continue
                self._pending.extend((entry, start, self._decoded) for entry in event.logprobs)
                text = self._stop.feed(event.text)
                released = self._release(len(self._stop.shown), self._stop.stopped)
                if text or released:
                    self._shown.append(text)
                    yield dataclasses.replace(event, text=text, logprobs=released)
                if self._stop.stopped:
                    async for ev in self._stopped(event):
                        yield ev
                    return
            elif isinstance(event, AnswerCompleted) and self._stop is not None:
                tail = self._stop.flush()
                released = self._release(len(self._stop.shown), True)
                if tail or released:
                    self._shown.append(tail)
                    yield Token(event.conversation_id, event.turn, -1, tail, len(event.token_ids), logprobs=released)
                self.answer = event
                yield event
                async for ev in self._memorize(event):
                    yield ev
                return
            else:
                yield event

    def _release(self, shown: int, final: bool) -> tuple[TokenLogprob, ...]:
        """The pending tokens now reported: those whose text has been shown whole (and starts
        before the shown end: a token that ends mid-character waits for the character), or at
        the end (``final``) every one that starts before the shown end."""
        n = 0
        for _, start, end in self._pending:
            if not (start < shown and (final or end <= shown)):
                break
            n += 1
        released, self._pending = self._pending[:n], [] if final else self._pending[n:]
        return self._report(released)

    def _report(self, entries: list[tuple[TokenLogprob, int, int]]) -> tuple[TokenLogprob, ...]:
        for entry, start, _ in entries:
            self.logprobs.append(entry)
            self.offsets.append(start)
        return tuple(entry for entry, _, _ in entries)

    async def _raw(self) -> AsyncIterator[Event]:
        assert self._stream is not None, "call start() first"
        while self._ahead:
            yield self._ahead.pop(0)
        try:
            async for event in self._stream:
                self._see(event)
                yield event
        except Exception as exc:
            self._failed = True
            raise from_engine_error(exc, self._param) from exc

    async def _stopped(self, last: Token) -> AsyncIterator[Event]:
        """A stop sequence matched: end the decoding, then write the shown text to memory."""
        assert self._stream is not None
        await self._stream.aclose()  # type: ignore[attr-defined]
        answer = AnswerCompleted(last.conversation_id, last.turn, "".join(self._shown), (), "stop", 0.0, 0.0, 0.0, 0.0)
        self.answer = answer
        self._metrics.finished.labels(self._metrics.model, "stop").inc()
        self._metrics.completion_tokens.inc(self._seen_tokens)
        yield answer
        async for ev in self._memorize(answer):
            yield ev

    async def _memorize(self, answer: AnswerCompleted) -> AsyncIterator[Event]:
        """``memorize`` the shown answer; its memory events, reported as this turn's."""
        if answer.finish_reason == "cancelled":
            return
        seen: list[MemoryEvent] = []
        arrived = threading.Event()

        def collect(ev: MemoryEvent) -> None:
            seen.append(ev)
            if isinstance(ev, MemoryUpdated):
                arrived.set()

        subscription = self._conv.memory_events.subscribe(collect)
        try:
            text = "".join(self._shown)
            try:
                await anyio.to_thread.run_sync(lambda: self._conv.memorize(self._query, text))
            except Exception as exc:
                version = self._conv.stm_version
                cid, number = answer.conversation_id, answer.turn
                yield InteractionFailed(cid, number, type(exc).__name__, str(exc), "memory", version)
                return
            await anyio.to_thread.run_sync(lambda: arrived.wait(5.0))
        finally:
            subscription.dispose()
        for ev in seen:
            if isinstance(ev, (MemoryUpdateStarted, MemoryUpdated)):
                mine = dataclasses.replace(ev, turn=answer.turn)
                self._see(mine)
                yield mine

    async def answer_only(self) -> TurnSummary:
        """Read up to the answer and leave the memory update to run in the background.

        With stop sequences the write of the shown text is awaited (it is this turn's own)."""
        async for event in self.events():
            if isinstance(event, AnswerCompleted) and self._stop is None:
                break
        await self.aclose()
        return self.summary()

    def summary(self) -> TurnSummary:
        assert self.answer is not None
        a = self.answer
        text = "".join(self._shown)
        tokens = len(a.token_ids) if a.token_ids or a.finish_reason != "stop" else self._seen_tokens
        reasoning = "".join(self._reasoning)
        return TurnSummary(
            self.number or a.turn,
            text,
            self.input_tokens,
            tokens,
            a.finish_reason,
            reasoning,
            self._reasoning_tokens,
            tuple(self.logprobs),
            tuple(self.offsets),
        )

    async def aclose(self) -> None:
        """Stop listening; cancels the turn if its answer is not complete."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            await self._stream.aclose()  # type: ignore[attr-defined]
        if self.answer is None and self._stream is not None and not self._failed:
            self._metrics.cancelled.inc()

    def _see(self, event: Event) -> None:
        m = self._metrics
        if isinstance(event, QueryReceived):
            self.input_tokens = len(event.token_ids)
            self.number = event.turn
            m.prompt_tokens.inc(self.input_tokens)
        elif isinstance(event, Token):
            self._seen_tokens += event.count
            now = time.perf_counter()
            if self._last_token is not None:  # one observation per gap; merged tokens share theirs
                gap = (now - self._last_token) / event.count
                for _ in range(event.count):
                    m.inter_token.observe(gap)
            self._last_token = now
        elif isinstance(event, AnswerCompleted):
            self.answer = event
            m.completion_tokens.inc(len(event.token_ids))
            m.ttft.observe(event.ttft_s)
            m.e2e.observe(event.duration_s)
            m.queue_time.observe(event.queued_s)
            m.finished.labels(m.model, event.finish_reason).inc()
        elif isinstance(event, MemoryUpdated):
            self.memory_committed = True
        elif isinstance(event, InteractionFailed) and event.stage == "memory" and _store_failure(event):
            m.store_errors.inc()


def _store_failure(event: InteractionFailed) -> bool:
    return event.error_type == "StaleStateError" or "could not store" in event.message


# ---------------------------------------------------------------------- server-sent events
def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event: ``event: NAME`` if named, one ``data:`` line of compact JSON."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def sse_response(chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    """A ``text/event-stream`` response of ``chunks``, unbuffered by proxies."""
    return StreamingResponse(chunks, media_type="text/event-stream", headers={**_SSE_HEADERS, **(headers or {})})
