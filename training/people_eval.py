"""``rxrt eval memory``: recall of facts told the way people tell them, split by what is new.

Every probe ends with a question about a fact stated (or corrected) exactly ``k`` turns earlier,
and is played as in production (greedy answers, the model's own answers written to memory; see
``mrqbench.run_dialogues``). A probe scores when the whole answer, case- and space-normalised,
equals the reference ("Your name is Ada.", or "I don't know your name." for a never-stated fact).
Each split is scored twice, with memory and with the STM reset before every turn.

Splits (``SPLITS``):

* ``in_domain``: training values and phrasings, 1-3 facts in play;
* ``unseen_values``: values no training dialogue contains (held-out locales, families, partition);
* ``held_out_phrasings``: statement, question and frame families training never renders;
* ``facts_1`` .. ``facts_4``: exactly that many facts in play;
* ``corrections``: the asked fact was stated, then replaced; the new value is right;
* ``never_stated``: 1-2 other facts stated, the question asks one never stated;
* ``hand_written``: 48 dialogues written by hand, not by the generator (``data/hand_written.py``):
  introductions, asides, facts inside longer sentences, corrections, several facts in one turn,
  never-stated facts, each question in its own words. Its record also counts answers that contain
  the value at all (``value_in_answer``), beside the exact answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rxruntime.models.rxt import RxTModel
from rxruntime.models.tokenizer import RxTokenizer

from .data.dialogues import Dialogue
from .data.hand_written import hand_written_probes
from .data.people import PeopleGenerator, ProbeKind
from .data.phrasings import PhraseSplit
from .data.values import ValueSplit
from .mrqbench import GAPS, group_by_length, normalise, run_dialogues

BENCH_SEED = 31337


@dataclass(frozen=True)
class SplitSpec:
    values: ValueSplit
    phrasings: PhraseSplit
    facts: tuple[int, ...]
    """Facts in play, cycled over the probes of each gap."""
    kind: ProbeKind = "recall"


SPLITS: dict[str, SplitSpec] = {
    "in_domain": SplitSpec("train", "train", (1, 2, 3)),
    "unseen_values": SplitSpec("unseen", "train", (1, 2, 3)),
    "held_out_phrasings": SplitSpec("train", "held_out", (1, 2, 3)),
    "facts_1": SplitSpec("train", "train", (1,)),
    "facts_2": SplitSpec("train", "train", (2,)),
    "facts_3": SplitSpec("train", "train", (3,)),
    "facts_4": SplitSpec("train", "train", (4,)),
    "corrections": SplitSpec("train", "train", (1, 2), "correction"),
    "never_stated": SplitSpec("train", "train", (1, 2), "never_stated"),
}


HAND_WRITTEN = "hand_written"
EVAL_SPLITS: tuple[str, ...] = (*SPLITS, HAND_WRITTEN)
"""Every split ``rxrt eval memory`` scores: the generator's (``SPLITS``) and the hand-written one."""


def split_probes(split: str, gaps: Sequence[int], per_gap: int, seed: int = BENCH_SEED) -> dict[int, list[Dialogue]]:
    """``per_gap`` evaluation dialogues of ``split`` for each gap ``k`` (a pure function of the seed;
    ``hand_written`` has 48 items, so at most that many)."""
    if split == HAND_WRITTEN:
        return hand_written_probes(gaps, per_gap, seed)
    spec = SPLITS[split]
    gen = PeopleGenerator(
        seed * 1000 + list(SPLITS).index(split), values=spec.values, phrasings=spec.phrasings, purpose="bench"
    )
    return {k: [gen.probe(k, spec.facts[i % len(spec.facts)], spec.kind) for i in range(per_gap)] for k in gaps}


def evaluate(
    model: RxTModel,
    tokenizer: RxTokenizer,
    per_gap: int = 50,
    gaps: Sequence[int] = GAPS,
    splits: Sequence[str] = EVAL_SPLITS,
    seed: int = BENCH_SEED,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """The ``rxrt eval memory --json`` record: per split, accuracy per gap with memory and with resets.

    All splits' dialogues are pooled and batched by length, so the model runs few, full batches.
    ``progress(done, total)`` is told the dialogues played so far (both settings count) after each batch.
    """
    unknown = sorted(set(splits) - set(EVAL_SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; known: {', '.join(EVAL_SPLITS)}")
    model.eval()
    tagged = [
        ((split, k), d) for split in splits for k, ds in split_probes(split, gaps, per_gap, seed).items() for d in ds
    ]
    count = {key: 0 for key, _ in tagged}
    for key, _ in tagged:
        count[key] += 1
    result: dict[str, object] = {}
    scores: dict[str, dict[tuple[str, int], int]] = {}
    contains: dict[str, dict[tuple[str, int], int]] = {}
    played, total = 0, 2 * len(tagged)
    for setting in ("with_memory", "reset_memory"):
        correct = dict.fromkeys(count, 0)
        found = dict.fromkeys(count, 0)
        for group in group_by_length(tagged, batch_size):
            dialogues = [d for _, d in group]
            answers = run_dialogues(
                model, tokenizer, dialogues, reset_memory=setting == "reset_memory", seed=seed + len(dialogues[0])
            )
            for (key, d), a in zip(group, answers):
                asked = d.turns[-1]
                exact = normalise(a[-1]) == normalise(asked.answer)
                correct[key] += exact
                found[key] += exact if asked.value is None else normalise(asked.value) in normalise(a[-1])
            played += len(group)
            if progress is not None:
                progress(played, total)
        scores[setting], contains[setting] = correct, found
    settings = ("with_memory", "reset_memory")
    per_split: dict[str, dict[str, object]] = {}
    for split in splits:
        record: dict[str, object] = {
            setting: {str(k): scores[setting][(split, k)] / count[(split, k)] for k in gaps} for setting in settings
        }
        record["dialogues"] = sum(count[(split, k)] for k in gaps)
        if split == HAND_WRITTEN:
            record["value_in_answer"] = {
                setting: {str(k): contains[setting][(split, k)] / count[(split, k)] for k in gaps}
                for setting in settings
            }
        per_split[split] = record
    result["splits"] = per_split
    result["seed"] = seed
    return result


def mean(per_gap: dict[str, float], up_to: int | None = None) -> float:
    """Mean accuracy over the gaps ``k <= up_to`` (all when ``None``)."""
    values = [v for k, v in per_gap.items() if up_to is None or int(k) <= up_to]
    return sum(values) / len(values) if values else float("nan")
