"""The default model card's first-minutes figures, replayed from many starting memories.

Each conversation starts from a fresh random STM (``engine.conversation(seed=s)``) and the
model's greedy answers depend on it, so one transcript says little; this replays the card's
dialogues from ``--seeds`` starting memories, through the engine as ``rxrt chat`` runs it, and
counts per answer how often it is the expected one:

* the card's transcript (greetings, "I don't know", a name, a sum, a city, a joke);
* the same two facts in either order (city first, then name; name first, then city);
* a city given as system memory (``memory_init``) against the same sentence said in a turn,
  for twelve capitals (seed 0) and for the three of ``examples/fan_out.py`` (every seed);
* ``--card smol`` (the default): issue 24's first minutes for the SmolLM2-backbone model, the
  default model (its answers are sentences: a turn is right when it names the value); ``--card
  small`` the small model's card above.

Run::

    python benchmarks/first_minutes.py                       # the default model, 30 seeds, prints the tables
    python benchmarks/first_minutes.py --json benchmarks/results/first-minutes-smol.json
    python benchmarks/first_minutes.py --card small --json benchmarks/results/first-minutes.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import rxruntime

GREETING = ("hello", "hi", "hey", "good morning", "good evening", "nice to meet you")

Check = Callable[[str], bool]


def exactly(expected: str) -> Check:
    return lambda answer: answer == expected


def greets(name: str = "") -> Check:
    return lambda answer: answer.lower().startswith(GREETING) and name in answer


def any_answer(answer: str) -> bool:
    return bool(answer.strip())


# (query, what counts as right for its answer)
TRANSCRIPT: list[tuple[str, Check]] = [
    ("Hello!", greets()),
    ("What is my name?", exactly("I don't know your name.")),
    ("Hi! I'm Ada, nice to meet you.", greets("Ada")),
    ("What is 3 plus 5?", exactly("3 plus 5 is 8.")),
    ("What is my name?", exactly("Your name is Ada.")),
    ("Where do I live?", exactly("I don't know where you live.")),
    ("I live in Lisbon.", any_answer),
    ("Tell me a joke.", any_answer),
    ("Where do I live?", exactly("You live in Lisbon.")),
]


def mentions(*values: str) -> Check:
    """A sentence answer (the SmolLM2 model's) is right when it names every value."""
    return lambda answer: all(v.lower() in answer.lower() for v in values)


def names_none(*values: str) -> Check:
    return lambda answer: not any(v.lower() in answer.lower() for v in values)


# issue 24's first minutes, for the SmolLM2-backbone model (``--card smol``): answers are
# sentences, so a turn is right when it names the value (and a sum when it says 8)
SMOL_TRANSCRIPT: list[tuple[str, Check]] = [
    ("Hi there! I'm Marguerite and I grew up in Quebec City.", any_answer),
    ("Do you remember my name?", mentions("Marguerite")),
    ("And where did I grow up?", mentions("Quebec")),
    ("My favourite food is sushi.", any_answer),
    ("What is 4 plus 4?", mentions("8")),
    ("What food do I like?", mentions("sushi")),
    ("What is my name?", mentions("Marguerite")),
]
SMOL_NEVER_SAID: list[tuple[str, Check]] = [
    ("Hello! How are you today?", any_answer),
    ("What is my name?", names_none("Marguerite", "Ada", "Julia")),
    ("My name is Julia and I work as a nurse.", any_answer),
    ("What do I do for a living?", mentions("nurse")),
    ("What is my name?", mentions("Julia")),
]
CITY = ("I live in Lisbon.", "Where do I live?", "You live in Lisbon.")  # (fact, question, answer)
NAME = ("My name is Julia.", "What is my name?", "Your name is Julia.")


def two_facts(first: tuple[str, str, str], second: tuple[str, str, str]) -> list[tuple[str, Check]]:
    """A fact, a sum, its question, then the second fact and its question."""
    return [
        (first[0], any_answer),
        ("What is 3 plus 5?", exactly("3 plus 5 is 8.")),
        (first[1], exactly(first[2])),
        (second[0], any_answer),
        (second[1], exactly(second[2])),
    ]


CITY_FIRST = two_facts(CITY, NAME)
NAME_FIRST = two_facts(NAME, CITY)
CAPITALS = (
    "Oslo", "Berlin", "Cairo", "Rome", "Paris", "Lisbon", "Madrid", "Vienna", "Athens", "Dublin", "Lima", "Tokyo"
)  # fmt: skip
FAN_OUT = ("Oslo", "Berlin", "Cairo")  # examples/fan_out.py


def play(engine: rxruntime.Engine, queries: Sequence[str], seed: int, memory_init: str | None = None) -> list[str]:
    conv = engine.conversation(seed=seed, memory_init=memory_init)
    try:
        return [conv.ask(q, temperature=0.0, max_new_tokens=32, timeout=120) for q in queries]
    finally:
        conv.close()


@dataclass
class Row:
    """One turn of a replayed dialogue: how many starting memories got it right, a few misses."""

    query: str
    right: int = 0
    wrong: list[str] = field(default_factory=list)


def replay(engine: rxruntime.Engine, dialogue: list[tuple[str, Check]], seeds: range) -> list[Row]:
    rows = [Row(query) for query, _ in dialogue]
    for seed in seeds:
        answers = play(engine, [q for q, _ in dialogue], seed)
        for row, (_, check), answer in zip(rows, dialogue, answers):
            if check(answer):
                row.right += 1
            elif len(row.wrong) < 3:
                row.wrong.append(answer)
    return rows


def recalled(engine: rxruntime.Engine, city: str, seed: int, as_system_memory: bool) -> bool:
    fact, question = f"I live in {city}.", "Where do I live?"
    if as_system_memory:
        answer = play(engine, [question], seed, memory_init=fact)[-1]
    else:
        answer = play(engine, [fact, question], seed)[-1]
    return answer == f"You live in {city}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model name or directory (default: the card's model, default or small)")
    parser.add_argument("--seeds", type=int, default=30, help="starting memories per dialogue")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--card",
        choices=("small", "smol"),
        default="smol",
        help="whose card's dialogues (default: smol, the default model's)",
    )
    args = parser.parse_args()
    if args.model is None:
        args.model = "default" if args.card == "smol" else "small"
    torch.set_num_threads(1)  # as the card's figures were measured
    seeds = range(args.seeds)
    out: dict[str, object] = {"model": args.model, "seeds": args.seeds}
    if args.card == "smol":
        with rxruntime.load(args.model) as engine:
            for name, dialogue in (("transcript", SMOL_TRANSCRIPT), ("never_said", SMOL_NEVER_SAID)):
                rows = replay(engine, dialogue, seeds)
                out[name] = [asdict(row) for row in rows]
                print(f"\n{name} (right of {args.seeds} starting memories)")
                for row in rows:
                    print(f"  {row.right:>3}  {row.query:<58} {row.wrong if row.wrong else ''}")
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
        return
    with rxruntime.load(args.model) as engine:
        for name, dialogue in (("transcript", TRANSCRIPT), ("city_first", CITY_FIRST), ("name_first", NAME_FIRST)):
            rows = replay(engine, dialogue, seeds)
            out[name] = [asdict(row) for row in rows]
            print(f"\n{name} (right of {args.seeds} starting memories)")
            for row in rows:
                print(f"  {row.right:>3}  {row.query:<34} {row.wrong if row.wrong else ''}")
        capitals = {
            city: {"turn": recalled(engine, city, 0, False), "memory_init": recalled(engine, city, 0, True)}
            for city in CAPITALS
        }
        out["capitals_seed0"] = capitals
        print(
            f"\ntwelve capitals (seed 0): said in a turn {sum(c['turn'] for c in capitals.values())}, "
            f"as memory_init {sum(c['memory_init'] for c in capitals.values())} of {len(CAPITALS)}"
        )
        print("  missed in a turn:", [c for c, r in capitals.items() if not r["turn"]] or "none")
        print("  missed as memory_init:", [c for c, r in capitals.items() if not r["memory_init"]] or "none")
        fan_out = {city: sum(recalled(engine, city, s, True) for s in seeds) for city in FAN_OUT}
        out["fan_out_memory_init"] = fan_out
        print(f"\nexamples/fan_out.py cities as memory_init (right of {args.seeds}): {fan_out}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
