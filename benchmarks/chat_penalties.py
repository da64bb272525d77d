"""How the default model's answers change with presence/frequency penalties: recall and loops.

For each setting, from N starting memories (conversation seeds): six one-fact probes ("My name is
Marguerite." then "What is my name?", the value in the second answer counts), six ordinary chat
questions ("Why is the sky blue?") and six questions with a number for an answer ("What is 12 plus
7?", the number named counts: a penalty lowers a digit the answer already wrote, as any token). An
answer *loops* when some run of four words comes back in it.
Chat answers that start "I don't know" are counted too (the memory taking a question for a recall
question). Greedy, the model's answer cap, int8 as `rxrt chat` runs it; the conversations of all
settings run concurrently through one engine.

    python benchmarks/chat_penalties.py --seeds 12 --settings "0,0;0.5,0.5;0.5,0;0,1;0.3,0.3" \
        --out benchmarks/results/chat-penalties-smol.json

docs/default-model.md ("Penalties") has the recorded result.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import rxruntime
from rxruntime.bench.overlap import cpu_model
from rxruntime.engine import Engine

FACTS = [
    ("My name is Marguerite.", "What is my name?", "marguerite"),
    ("I live in Lisbon.", "Where do I live?", "lisbon"),
    ("My favourite food is sushi.", "What food do I like?", "sushi"),
    ("I work as a nurse.", "What is my job?", "nurse"),
    ("My dog is called Biscuit.", "What is my dog's name?", "biscuit"),
    ("I grew up in Quebec City.", "Where did I grow up?", "quebec"),
]
CHAT = [
    "Tell me about the ocean.",
    "What do you like to do on weekends?",
    "Can you recommend a good book?",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "What is your favourite season?",
]
SUMS = [
    ("What is 4 plus 4?", "8"),
    ("What is 12 plus 7?", "19"),
    ("What is 3 times 3?", "9"),
    ("What is 10 minus 4?", "6"),
    ("How many legs does a cat have?", "4"),
    ("What is 6 plus 5?", "11"),
]


def loops(text: str) -> bool:
    """Whether some run of four words occurs twice."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return len(grams) != len(set(grams))


def _play(engine: Engine, job: tuple[tuple[float, float], int, str, Any]) -> dict[str, Any]:
    (presence, frequency), seed, kind, item = job
    conversation = engine.conversation(seed=seed)
    options: dict[str, Any] = dict(temperature=0.0, presence_penalty=presence, frequency_penalty=frequency)
    try:
        if kind == "fact":
            statement, question, value = item
            first = conversation.ask(statement, timeout=1800, **options)
            second = conversation.ask(question, max_new_tokens=16, timeout=1800, **options)
            recalled = value in second.lower()
            return dict(setting=[presence, frequency], seed=seed, kind=kind, query=statement, answer=first,
                        question=question, reply=second, recalled=recalled, loops=loops(first))  # fmt: skip
        if kind == "sum":
            question, number = item
            answer = conversation.ask(question, timeout=1800, **options)
            named = re.search(rf"\b{number}\b", answer) is not None
            return dict(setting=[presence, frequency], seed=seed, kind=kind, query=question, answer=answer, named=named)
        answer = conversation.ask(item, timeout=1800, **options)
        return dict(setting=[presence, frequency], seed=seed, kind=kind, query=item, answer=answer,
                    loops=loops(answer), dont_know=answer.startswith("I don't know"))  # fmt: skip
    finally:
        conversation.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--seeds", type=int, default=12, help="starting memories per setting")
    parser.add_argument("--settings", default="0,0;0.5,0.5", help="presence,frequency pairs separated by ';'")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = [tuple(float(x) for x in pair.split(",")) for pair in args.settings.split(";")]
    jobs: list[tuple[tuple[float, float], int, str, Any]] = [
        ((s[0], s[1]), seed, kind, item)
        for s in settings
        for seed in range(args.seeds)
        for kind, items in (("fact", FACTS), ("chat", CHAT), ("sum", SUMS))
        for item in items
    ]
    start = time.perf_counter()
    with rxruntime.load(args.model) as engine, ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(lambda job: _play(engine, job), jobs))
    summary = []
    for presence, frequency in settings:
        mine = [r for r in rows if r["setting"] == [presence, frequency]]
        facts = [r for r in mine if r["kind"] == "fact"]
        chat = [r for r in mine if r["kind"] == "chat"]
        sums = [r for r in mine if r["kind"] == "sum"]
        summary.append(dict(
            presence_penalty=presence, frequency_penalty=frequency, fact_probes=len(facts), chat_questions=len(chat),
            recalled=sum(r["recalled"] for r in facts) / len(facts),
            statement_replies_looping=sum(r["loops"] for r in facts) / len(facts),
            chat_answers_looping=sum(r["loops"] for r in chat) / len(chat),
            chat_answers_i_dont_know=sum(r["dont_know"] for r in chat) / len(chat),
            numbers_named=sum(r["named"] for r in sums) / len(sums),
        ))  # fmt: skip
        print(json.dumps(summary[-1]))
    if args.out is not None:
        record = dict(cpu=cpu_model(), model=args.model, seeds=args.seeds, seconds=time.perf_counter() - start,
                      summary=summary, rows=rows)  # fmt: skip
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
