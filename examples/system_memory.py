"""A conversation whose memory starts from a system text instead of a blank (random) STM.

The text is encoded and written to memory before the first turn, like a system prompt, but it
costs nothing per turn afterwards: it lives in the STM, not in the prompt.

Run::

    python examples/system_memory.py
"""

from __future__ import annotations

from _common import engine_from_args


def main() -> None:
    engine, _ = engine_from_args(__doc__ or "")
    with engine:
        system = "My name is Zoe."
        primed = engine.conversation("primed", memory_init=system)
        blank = engine.conversation("blank")
        for query in ["What is my name?", "Who am I?"]:
            print(f"> {query}")
            print(f"  with system memory: {primed.ask(query)}")
            print(f"  blank memory:       {blank.ask(query)}")


if __name__ == "__main__":
    main()
