"""Recall when several facts are in play, in the training templates' words: the default model
card's figures for the previous default (``nano-templates``).

``rxrt eval memory --suite templates`` states one fact per dialogue. Here each of
``--dialogues`` dialogues states 1, 2 or 3 facts of different kinds in consecutive turns, then a
distractor, then asks about every fact in random order; the score is exact recall per question
(greedy, the model's own answers written to memory), as in ``rxruntime.training.mrqbench``::

    python benchmarks/multi_fact_recall.py --model runs/nano-templates/model   # the card's figures

The shipped model's figures with several facts in play are the ``facts_1`` .. ``facts_4`` splits
of ``rxrt eval memory``, in the people generator's words.
"""

from __future__ import annotations

import argparse
import random

from rxruntime.models import load_pretrained
from rxruntime.training.data.dialogues import FACT_TYPES, Dialogue, Turn
from rxruntime.training.mrqbench import normalise, run_dialogues


def dialogue(rng: random.Random, facts: int) -> tuple[Dialogue, int]:
    """A dialogue and the index of its first question."""
    kinds = rng.sample(FACT_TYPES, facts)
    values = [rng.choice(f.train_values) for f in kinds]
    told = [
        Turn(f.statements[0].format(v=v), f.acknowledgements[0].format(v=v), "fact", f.slot, v)
        for f, v in zip(kinds, values)
    ]
    told.append(Turn("What is 4 plus 3?", "4 plus 3 is 7."))
    asked = [Turn(f.questions[0], f.answer.format(v=v), "question", f.slot, v) for f, v in zip(kinds, values)]
    rng.shuffle(asked)
    return Dialogue(tuple(told + asked)), len(told)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dialogues", type=int, default=100)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer = load_pretrained(args.model)
    assert tokenizer is not None
    model.eval()
    rng = random.Random(args.seed)
    for facts in (1, 2, 3):
        made = [dialogue(rng, facts) for _ in range(args.dialogues)]
        answers = run_dialogues(model, tokenizer, [d for d, _ in made], reset_memory=False)
        correct = [
            normalise(a[i]) == normalise(d.turns[i].answer)
            for (d, first), a in zip(made, answers)
            for i in range(first, len(d))
        ]
        print(f"{facts} fact(s): {sum(correct) / len(correct):.0%} of {len(correct)} questions recalled")


if __name__ == "__main__":
    main()
