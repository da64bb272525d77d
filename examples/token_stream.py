"""An app subscribing to a conversation's token stream, and to its memory updates.

Run::

    python examples/token_stream.py
"""

from __future__ import annotations

import threading

from _common import engine_from_args

from rxruntime.events import AnswerCompleted, Event, MemoryUpdated, Token


def main() -> None:
    engine, _ = engine_from_args(__doc__ or "")
    with engine:
        conv = engine.conversation(seed=0)  # a fixed starting memory: the same output every run

        def on_memory(event: Event) -> None:  # arrives in the background, after each answer
            if isinstance(event, MemoryUpdated):
                print(f"  [memory v{event.stm_version}, {event.duration_s * 1e3:.0f} ms]")

        conv.memory_events.subscribe(on_memory)
        queries = [
            "I live in Lisbon.",
            "What is 3 plus 5?",
            "Where do I live?",
            "My name is Julia.",
            "What is my name?",
        ]
        for query in queries:
            done = threading.Event()

            def on_next(event: Event) -> None:
                if isinstance(event, Token):
                    print(event.text, end="", flush=True)  # arrives piece by piece, as generated
                elif isinstance(event, AnswerCompleted):
                    print(f"\n  [{len(event.token_ids)} tokens, first after {event.ttft_s * 1e3:.0f} ms]")

            print(f"> {query}")
            conv.interact(query).subscribe(on_next, on_completed=done.set)  # completes after MemoryUpdated
            done.wait()


if __name__ == "__main__":
    main()
