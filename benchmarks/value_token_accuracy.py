"""Teacher-forced value-token accuracy of the last answer, with memory and with the STM reset.

Exact greedy recall (``rxrt eval memory``) stays at 0% until a model gets a whole answer right,
which hides the early progress a short pilot training makes. This reads the reference dialogue
(teacher forcing, as stage 4 trains), writes every earlier turn into the STM, and asks how many of
the final answer's tokens the decoder predicts, and how many of those that spell the value (the
tokens after the answer's fixed prefix, "Your name is"). Comparing with the STM reset before the
last turn shows how much of it comes from memory::

    python benchmarks/value_token_accuracy.py --model runs/pilot/model --dialogues 64
"""

from __future__ import annotations

import argparse
import json

import torch

from rxruntime.models import RxTModel, RxTokenizer, load_pretrained
from rxruntime.models.training.batches import IGNORE, dialogue_batches
from rxruntime.models.training.dialogues import Dialogue
from rxruntime.models.training.people_eval import SPLITS, split_probes


@torch.inference_mode()
def accuracy(model: RxTModel, tokenizer: RxTokenizer, dialogues: list[Dialogue], reset: bool) -> dict[str, float]:
    """Answer- and value-token accuracy of the last turn (dialogues of equal length)."""
    turns, _ = dialogue_batches(tokenizer, dialogues, model.config.max_seq_len, answer_only=True)
    generator = torch.Generator().manual_seed(0)
    stm = model.init_stm(len(dialogues), generator=generator)
    for batch in turns[:-1]:
        stm = model.memory_update(stm, batch.ids, batch.mask)
    if reset:
        stm = model.init_stm(len(dialogues), generator=generator)
    last = turns[-1]
    logits = model.decoder_logits(last.ids, stm)[:, :-1]
    hit = logits.argmax(-1) == last.targets
    answer = last.targets != IGNORE
    # the value's tokens: the answer's tokens minus its fixed prefix and the final "." [EOS]
    value = torch.zeros_like(answer)
    for i, d in enumerate(dialogues):
        reference, v = d.turns[-1].answer, d.turns[-1].value
        positions = answer[i].nonzero().flatten().tolist()
        if v is None or v not in reference:
            value[i, positions] = True  # "I don't know ...": the whole answer
            continue
        prefix = len(tokenizer.encode(reference[: reference.index(v)].rstrip()))
        value[i, positions[prefix:-2]] = True
    return {
        "answer": float(hit[answer].float().mean()),
        "value": float(hit[value].float().mean()) if bool(value.any()) else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dialogues", type=int, default=64, help="per split and k")
    parser.add_argument("--gaps", default="1,2,4")
    parser.add_argument("--splits", default=",".join(SPLITS))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(args.model)
    assert tokenizer is not None
    model.eval()
    result: dict[str, dict[str, dict[str, float]]] = {}
    for split in args.splits.split(","):
        for k, dialogues in split_probes(split, [int(g) for g in args.gaps.split(",")], args.dialogues).items():
            by_length: dict[int, list[Dialogue]] = {}
            for d in dialogues:
                by_length.setdefault(len(d), []).append(d)
            for setting, reset in (("with_memory", False), ("reset_memory", True)):
                scores = [(accuracy(model, tokenizer, ds, reset), len(ds)) for ds in by_length.values()]
                n = sum(w for _, w in scores)
                result.setdefault(split, {}).setdefault(setting, {})[str(k)] = {
                    key: round(sum(s[key] * w for s, w in scores) / n, 4) for key in ("answer", "value")
                }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
