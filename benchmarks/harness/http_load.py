"""Streamed Responses turns as a load generator sees them: timings, events, and their invariants.

The Ray failover script and the scaling benchmark drive the HTTP front (single-process or on Ray)
with many concurrent conversations through the official ``openai`` async client. Each turn is read
as raw server-sent events, so the time to first token is the client's (ingress, routing and
transfer included), every event is kept for the no-loss/no-duplicate check, and a stream that ends
with an error (a replica killed mid-answer) is recorded rather than raised.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai

# Facts the shipped model recalls through small talk at temperature 0 (its training templates):
# (statement, question, the word the answer must hold). The recall checks of the Ray scripts.
FACTS = [
    ("I live in Lisbon.", "Where do I live?", "Lisbon"),
    ("My name is Julia.", "What is my name?", "Julia"),
    ("My lucky number is 47.", "What is my lucky number?", "47"),
    ("I live in Paris.", "Where do I live?", "Paris"),
    ("I live in Tokyo.", "Where do I live?", "Tokyo"),
    ("I live in Berlin.", "Where do I live?", "Berlin"),
]
SMALL_TALK = ["What is 3 plus 5?", "Count from 2 to 5.", "What is 2 plus 3?"]


@dataclass
class TurnRecord:
    query: str
    conversation: str | None = None
    replica: str | None = None  # the x-rxrt-replica header (Ray only)
    status: int = 0
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    text: str = ""
    output_tokens: int = 0
    ttft_s: float | None = None  # request sent -> first text delta received
    total_s: float = 0.0
    error: str | None = None  # the error event's or status's message, if the turn failed
    error_code: str | None = None
    stm_version: int | None = None  # of its rxrt.memory.updated

    @property
    def ok(self) -> bool:
        return self.error is None and self.stm_version is not None

    def problems(self) -> list[str]:
        """What breaks the stream's invariants (empty for a whole, well-formed turn)."""
        if self.error is not None:
            return []
        kinds = [k for k, _ in self.events]
        found = []
        numbers = [d.get("sequence_number") for _, d in self.events]
        if numbers != list(range(len(numbers))):
            found.append(f"sequence numbers {numbers}")
        for kind in ("response.created", "response.completed", "rxrt.memory.update_started", "rxrt.memory.updated"):
            if kinds.count(kind) != 1:
                found.append(f"{kind} x{kinds.count(kind)}")
        deltas = "".join(d.get("delta", "") for k, d in self.events if k == "response.output_text.delta")
        if deltas != self.text:
            found.append(f"deltas {deltas!r} != answer {self.text!r}")
        return found


async def stream_turn(
    client: openai.AsyncOpenAI,
    query: str,
    conversation: str | None = None,
    on_event: Callable[[TurnRecord, str], None] | None = None,
    temperature: float | None = None,
) -> TurnRecord:
    """One streamed ``POST /v1/responses`` turn, never raising for a failed turn; ``on_event`` sees
    each event's kind as it arrives (the failover script kills a replica from it)."""
    record = TurnRecord(query, conversation)
    started = time.perf_counter()
    try:
        async with client.responses.with_streaming_response.create(
            model="rxt",
            input=query,
            stream=True,
            conversation=conversation or openai.omit,
            temperature=temperature if temperature is not None else openai.omit,
        ) as raw:
            record.status = raw.status_code
            record.replica = raw.headers.get("x-rxrt-replica")
            kind = ""
            async for line in raw.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    record.events.append((kind, data))
                    _see(record, kind, data, started)
                    if on_event is not None:
                        on_event(record, kind)
    except openai.APIStatusError as exc:
        record.status = exc.status_code
        record.error = exc.message
        body = exc.body if isinstance(exc.body, dict) else {}
        record.error_code = str(body.get("code")) if body.get("code") else None
    except openai.APIError as exc:  # connection dropped, timeout
        record.error = f"{type(exc).__name__}: {exc}"
    record.total_s = time.perf_counter() - started
    return record


def _see(record: TurnRecord, kind: str, data: dict[str, Any], started: float) -> None:
    if kind == "response.created":
        record.conversation = (data["response"].get("conversation") or {}).get("id", record.conversation)
    elif kind == "response.output_text.delta" and record.ttft_s is None:
        record.ttft_s = time.perf_counter() - started
    elif kind in ("response.completed", "response.incomplete"):
        response = data["response"]
        record.text = response["output"][0]["content"][0]["text"] if response["output"] else ""
        record.output_tokens = int(response["usage"]["output_tokens"])
    elif kind == "rxrt.memory.updated":
        record.stm_version = int(data["stm_version"])
    elif kind == "error":
        record.error = str(data.get("message"))
        record.error_code = str(data.get("code"))
