"""Two conversations talking to each other for N rounds: B's query is A's answer, and back.

Composed with reactivex operators: each answer is flat-mapped into the other agent's next turn.
Each agent remembers its side of the dialogue in its own STM.

Run::

    python examples/two_agents.py --rounds 4
"""

from __future__ import annotations

import reactivex
from _common import engine_from_args
from reactivex import Observable
from reactivex import operators as ops

from rxruntime import Conversation
from rxruntime.events import AnswerCompleted, Event


def dialogue(
    speaker: Conversation, listener: Conversation, query: str | list[int], rounds: int
) -> Observable[tuple[str, str]]:
    """(speaker id, answer) for ``rounds`` answers, alternating between the two agents."""
    if rounds == 0:
        return reactivex.empty()
    # An answer must fit as the other agent's query (with its template and room for a reply).
    limit = speaker.backend.max_seq_len // 2 - 4

    def then_the_other_speaks(event: Event) -> Observable[tuple[str, str]]:
        assert isinstance(event, AnswerCompleted)
        this_line: Observable[tuple[str, str]] = reactivex.of((speaker.id, event.text))
        # the other agent hears the answer (as token ids: no detokenise/retokenise round trip)
        return reactivex.concat(this_line, dialogue(listener, speaker, list(event.token_ids), rounds - 1))

    answers: Observable[Event] = speaker.interact(query, max_new_tokens=limit).pipe(ops.filter(is_answer))
    return answers.pipe(ops.flat_map(then_the_other_speaks))


def is_answer(event: Event) -> bool:
    return isinstance(event, AnswerCompleted)


def main() -> None:
    engine, args = engine_from_args(__doc__ or "", rounds=(int, 4, "answers in total"))
    with engine:
        alice = engine.conversation("alice", memory_init="My name is Alice.")
        bob = engine.conversation("bob", memory_init="My name is Bob.")
        lines = dialogue(alice, bob, "Hi! Who are you?", args.rounds).pipe(ops.to_list()).run()
        for who, text in lines:
            print(f"{who}: {' '.join(text.split())}")
        print(f"alice STM v{alice.stm_version}, bob STM v{bob.stm_version}")


if __name__ == "__main__":
    main()
