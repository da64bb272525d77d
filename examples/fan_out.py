"""One query fanned out to several agents (each with its own memory) and the answers merged.

The agents decode in the same batch: the engine steps all of them together.

Run::

    python examples/fan_out.py "What do you like?"
"""

from __future__ import annotations

from collections.abc import Callable

import reactivex
from _common import engine_from_args
from reactivex import operators as ops

from rxruntime.events import AnswerCompleted, Event


def is_answer(event: Event) -> bool:
    return isinstance(event, AnswerCompleted)


def labelled(name: str) -> Callable[[Event], tuple[str, str]]:
    def label(event: Event) -> tuple[str, str]:
        assert isinstance(event, AnswerCompleted)
        return name, event.text

    return label


def main() -> None:
    engine, args = engine_from_args(__doc__ or "", query=(str, "Where do I live?", "the question for every agent"))
    with engine:
        people = {
            "oslo": "I live in Oslo.",
            "berlin": "I live in Berlin.",
            "cairo": "I live in Cairo.",
        }
        agents = {name: engine.conversation(name, memory_init=fact) for name, fact in people.items()}
        streams = [
            agent.interact(args.query).pipe(ops.filter(is_answer), ops.map(labelled(name)))
            for name, agent in agents.items()
        ]
        answers: list[tuple[str, str]] = reactivex.merge(*streams).pipe(ops.to_list()).run()
        for name, text in sorted(answers):
            print(f"{name}: {' '.join(text.split())}")


if __name__ == "__main__":
    main()
