"""An MRQbench-style memory retention benchmark: is a fact recalled ``k`` turns after it was stated?

Each probe dialogue is: 0-2 warm-up distractors, a fact ("I live in Lisbon."), ``k - 1``
distractors that need no memory, then the question ("Where do I live?"). The model runs the
dialogue as it would in production: greedy answers, and after every turn the encoder and memory
attention write the model's *own* answer into the STM. The score is exact recall: the generated
answer to the question, case- and whitespace-normalised, equals the reference ("You live in
Lisbon.").

Two settings, same model, same dialogues:

* ``with_memory``: the normal event-driven cycle;
* ``reset_memory``: the STM is replaced by a fresh random one before every turn (the ablation);
  whatever it still gets right is what the prompt and priors alone allow.

Two splits: ``main`` uses fact values from the training pools in dialogues training never
produced (a different generator stream, and a hash bucket training rejects); ``hard`` uses values
that occur nowhere in training text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from rxruntime.models.generation import generate
from rxruntime.models.rxt import RxTModel
from rxruntime.models.sampler import SamplingParams
from rxruntime.models.tokenizer import RxTokenizer

from .batches import pad
from .data.dialogues import Dialogue, DialogueGenerator, Split

GAPS = tuple(range(1, 9))
BENCH_SEED = 20251


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def probes(split: Split, gaps: Sequence[int], per_gap: int, seed: int = BENCH_SEED) -> dict[int, list[Dialogue]]:
    """``per_gap`` benchmark dialogues for each gap ``k``, warm-up length cycling 0, 1, 2."""
    gen = DialogueGenerator(seed, split=split, purpose="bench")
    return {k: [gen.probe(k, warmup=i % 3) for i in range(per_gap)] for k in gaps}


@torch.inference_mode()
def run_dialogues(
    model: RxTModel,
    tokenizer: RxTokenizer,
    dialogues: Sequence[Dialogue],
    reset_memory: bool,
    seed: int = 0,
    max_new_tokens: int = 32,
) -> list[list[str]]:
    """Play equally long dialogues as one batch; returns every generated answer (dialogue, turn)."""
    n_turns = len(dialogues[0])
    if any(len(d) != n_turns for d in dialogues):
        raise ValueError("run_dialogues needs dialogues of equal length (batch them by length)")
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams.model_default(model.config)  # greedy, and the model's penalties as served
    s = tokenizer.special
    stm = model.init_stm(len(dialogues), generator=generator)
    answers: list[list[str]] = [[] for _ in dialogues]
    for t in range(n_turns):
        if reset_memory and t > 0:
            stm = model.init_stm(len(dialogues), generator=generator)
        queries = [tokenizer.encode(d.turns[t].query) for d in dialogues]
        prompts = [tokenizer.prompt_ids(q) for q in queries]
        outputs = generate(model, stm, prompts, params, max_new_tokens=max_new_tokens)
        for i, out in enumerate(outputs):
            answers[i].append(tokenizer.decode(out))
        if t + 1 < n_turns and not reset_memory:
            rows = [
                tokenizer.interaction_from_ids(q, out)[: model.config.max_seq_len] for q, out in zip(queries, outputs)
            ]
            ids, mask = pad(rows, s.pad_id)
            stm = model.memory_update(stm, ids.to(model.device), mask.to(model.device))
    return answers


@dataclass
class SplitScores:
    with_memory: dict[int, float]
    reset_memory: dict[int, float]
    dialogues: int


def score_split(
    model: RxTModel,
    tokenizer: RxTokenizer,
    split: Split,
    per_gap: int,
    gaps: Sequence[int] = GAPS,
    seed: int = BENCH_SEED,
    batch_size: int = 256,
) -> SplitScores:
    """Exact-recall accuracy per gap, with memory and with the STM reset before every turn.

    Dialogues of every gap are pooled and batched by length (a gap-3 probe with one warm-up turn
    is as long as a gap-2 probe with two), so the model runs few, full batches.
    """
    by_gap = probes(split, gaps, per_gap, seed)
    tagged = [(k, d) for k, dialogues in by_gap.items() for d in dialogues]
    scores: dict[str, dict[int, float]] = {}
    for setting in ("with_memory", "reset_memory"):
        correct = dict.fromkeys(by_gap, 0)
        for group in group_by_length(tagged, batch_size):
            dialogues = [d for _, d in group]
            answers = run_dialogues(
                model, tokenizer, dialogues, reset_memory=setting == "reset_memory", seed=seed + len(dialogues[0])
            )
            for (k, d), a in zip(group, answers):
                correct[k] += normalise(a[-1]) == normalise(d.turns[-1].answer)
        scores[setting] = {k: correct[k] / len(by_gap[k]) for k in by_gap}
    return SplitScores(scores["with_memory"], scores["reset_memory"], len(tagged))


_K = TypeVar("_K")


def group_by_length(tagged: list[tuple[_K, Dialogue]], batch_size: int) -> list[list[tuple[_K, Dialogue]]]:
    """Tagged dialogues in batches of equal length (``run_dialogues`` plays one batch in lockstep)."""
    groups: dict[int, list[tuple[_K, Dialogue]]] = {}
    for item in tagged:
        groups.setdefault(len(item[1]), []).append(item)
    return [groups[n][i : i + batch_size] for n in sorted(groups) for i in range(0, len(groups[n]), batch_size)]


def benchmark(
    model: RxTModel,
    tokenizer: RxTokenizer,
    per_gap: int = 100,
    gaps: Sequence[int] = GAPS,
    seed: int = BENCH_SEED,
    hard: bool = True,
    batch_size: int = 256,
) -> dict[str, object]:
    """The ``rxrt eval memory --json`` record: main split at the top level, the hard split under ``hard``."""
    model.eval()
    main = score_split(model, tokenizer, "train", per_gap, gaps, seed, batch_size)
    result: dict[str, object] = {
        "with_memory": {str(k): v for k, v in main.with_memory.items()},
        "reset_memory": {str(k): v for k, v in main.reset_memory.items()},
        "dialogues": main.dialogues,
    }
    if hard:
        h = score_split(model, tokenizer, "hard", per_gap, gaps, seed, batch_size)
        result["hard"] = {
            "with_memory": {str(k): v for k, v in h.with_memory.items()},
            "reset_memory": {str(k): v for k, v in h.reset_memory.items()},
            "dialogues": h.dialogues,
        }
    result["seed"] = seed
    return result
