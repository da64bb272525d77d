"""Async code: stream a turn's events with ``astream`` (asyncio or trio through anyio).

Two conversations stream concurrently from one engine; cancelling a task cancels its turn.

Run::

    python examples/async_client.py
"""

from __future__ import annotations

import anyio
from _common import engine_from_args

from rxruntime import Conversation
from rxruntime.events import AnswerCompleted, MemoryUpdated, Token


async def talk(conv: Conversation, queries: list[str]) -> None:
    for query in queries:
        pieces = []
        async for event in conv.astream(query):
            if isinstance(event, Token):
                pieces.append(event.text)
            elif isinstance(event, AnswerCompleted):
                print(f"[{conv.id}] {query!r} -> {''.join(pieces)!r} ({event.ttft_s * 1e3:.0f} ms to first token)")
            elif isinstance(event, MemoryUpdated):
                print(f"[{conv.id}] memory v{event.stm_version}")


async def main() -> None:
    engine, _ = engine_from_args(__doc__ or "")
    with engine:
        a, b = engine.conversation("a"), engine.conversation("b")
        async with anyio.create_task_group() as tg:
            tg.start_soon(talk, a, ["My name is Julia.", "What is my name?"])
            tg.start_soon(talk, b, ["I live in Lima.", "Where do I live?"])


if __name__ == "__main__":
    anyio.run(main)
