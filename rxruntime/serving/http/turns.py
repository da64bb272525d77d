"""One turn of a conversation, driven from a request handler.

``start`` sends the query and waits for the first token (or an early end): every error that can
stop a turn before it answers (query too long, queue full, engine closed, conversation gone) is
known by then, so it becomes a proper HTTP status instead of a broken 200 stream. ``events`` then
gives the turn's events, the ones read ahead first.

Closing the turn (``aclose``, or the handler's task being cancelled because the client went away)
disposes the engine subscription: an answer still being decoded is cancelled within one decode
step, while a completed answer's memory update still commits (the engine always finishes it).

Streamed, a turn goes out as server-sent events (``sse``, ``sse_response``): a few lines of our
own rather than a dependency. An event is ``event: NAME`` (optional) and one ``data:`` line of
compact JSON, then a blank line. Starlette's ``StreamingResponse`` cancels the generator when the
client disconnects, which is what cancels the turn.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse

from rxruntime.conversation import Conversation
from rxruntime.events import AnswerCompleted, Event, InteractionFailed, MemoryUpdated, QueryReceived, Token
from rxruntime.serving.http.errors import from_engine_error
from rxruntime.serving.http.metrics import Metrics

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class TurnSummary:
    """What a response reports about a finished answer."""

    turn: int
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str


class Turn:
    def __init__(self, conv: Conversation, query: str, options: dict[str, Any], metrics: Metrics, param: str) -> None:
        self._conv = conv
        self._query = query
        self._options = options
        self._metrics = metrics
        self._param = param
        self._stream: AsyncIterator[Event] | None = None
        self._ahead: list[Event] = []
        self.input_tokens = 0
        self.number = 0  # the turn's number in its conversation, known once the query is received
        self.answer: AnswerCompleted | None = None
        self.memory_committed = False
        self._closed = False
        self._failed = False

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

    async def events(self) -> AsyncIterator[Event]:
        """The turn's events after ``start``: tokens, the answer, then the memory events."""
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

    async def answer_only(self) -> TurnSummary:
        """Read up to the answer and leave the memory update to run in the background."""
        async for event in self.events():
            if isinstance(event, AnswerCompleted):
                break
        await self.aclose()
        return self.summary()

    def summary(self) -> TurnSummary:
        assert self.answer is not None
        a = self.answer
        return TurnSummary(a.turn, a.text, self.input_tokens, len(a.token_ids), a.finish_reason)

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
            m.tokens.labels("input").inc(self.input_tokens)
        elif isinstance(event, AnswerCompleted):
            self.answer = event
            m.tokens.labels("output").inc(len(event.token_ids))
            m.ttft.observe(event.ttft_s)
            if event.tokens_per_s > 0:
                m.per_token.observe(1.0 / event.tokens_per_s)
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
