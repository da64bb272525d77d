"""Teacher-forced value-token accuracy of the last answer, with memory and with the STM reset.

Exact greedy recall (``rxrt eval memory``) stays at 0% until a model gets a whole answer right,
which hides the early progress a short pilot training makes. This reads the reference dialogue
(teacher forcing, as stage 4 trains), writes every earlier turn into the STM, and asks how many of
the final answer's tokens the decoder predicts, and how many of those that spell the value (the
tokens after the answer's fixed prefix, "Your name is"). Comparing with the STM reset before the
last turn shows how much of it comes from memory::

    python benchmarks/value_token_accuracy.py --model runs/pilot/model --dialogues 64
    python benchmarks/value_token_accuracy.py --run runs/pilot   # a run in progress: its last checkpoint
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rxruntime.models import RxTModel, RxTokenizer, load_pretrained
from rxruntime.training.batches import IGNORE, dialogue_batches
from rxruntime.training.data.dialogues import Dialogue
from rxruntime.training.mlm import MLMHead
from rxruntime.training.people_eval import SPLITS, split_probes
from rxruntime.training.recipe import recipe_from_dict
from rxruntime.training.state import STATE_FILE, load_state


@torch.inference_mode()
def accuracy(model: RxTModel, tokenizer: RxTokenizer, dialogues: list[Dialogue], setting: str) -> dict[str, float]:
    """Answer- and value-token accuracy of the last turn (dialogues of equal length).

    ``setting``: ``with_memory`` (the STM written from every earlier turn), ``reset_memory`` (a
    fresh STM), or ``encoded_previous`` (no STM: the decoder reads the encoder's states of the
    turn before, as stage 2 trained it to read its own turn's; at ``k = 1`` that turn states the
    fact, so this shows whether the decoder could answer if memory held what the encoder saw).
    """
    turns, _ = dialogue_batches(tokenizer, dialogues, model.config.max_seq_len, answer_only=True)
    generator = torch.Generator().manual_seed(0)
    stm = model.init_stm(len(dialogues), generator=generator)
    if setting == "encoded_previous":
        stm = model.encode(turns[-2].ids, turns[-2].mask)
    else:
        for batch in turns[:-1]:
            stm = model.memory_update(stm, batch.ids, batch.mask)
    if setting == "reset_memory":
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


def from_run(run: Path) -> tuple[RxTModel, RxTokenizer, str]:
    """The model of a training run's latest resumable state, and where in the curriculum it was."""
    recipe = recipe_from_dict(json.loads((run / "recipe.json").read_text(encoding="utf-8")))
    config = recipe.config()
    model = RxTModel(config)
    progress, _ = load_state(run / STATE_FILE, model, MLMHead(config))
    # a backbone's tokenizer keeps its own special ids (the config names them) and chat template
    tokenizer = RxTokenizer.from_file(run / "tokenizer.json", config.special_tokens)
    tokenizer.use_template(config)
    return model, tokenizer, f"{progress['stage']} step {progress['step']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--run", type=Path, help="a training run directory (its train-state), instead of --model")
    parser.add_argument("--dialogues", type=int, default=64, help="per split and k")
    parser.add_argument("--gaps", default="1,2,4")
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--settings", default="with_memory,reset_memory", help="also: encoded_previous")
    args = parser.parse_args()
    torch.manual_seed(0)
    where = args.model
    if args.run is not None:
        model, tokenizer, where = from_run(args.run)
    else:
        model, loaded = load_pretrained(args.model)
        assert loaded is not None
        tokenizer = loaded
    model.eval()
    result: dict[str, object] = {"at": where}
    for split in args.splits.split(","):
        for k, dialogues in split_probes(split, [int(g) for g in args.gaps.split(",")], args.dialogues).items():
            by_length: dict[int, list[Dialogue]] = {}
            for d in dialogues:
                by_length.setdefault(len(d), []).append(d)
            for setting in args.settings.split(","):
                scores = [(accuracy(model, tokenizer, ds, setting), len(ds)) for ds in by_length.values()]
                n = sum(w for _, w in scores)
                per_split = result.setdefault(split, {})
                assert isinstance(per_split, dict)
                per_split.setdefault(setting, {})[str(k)] = {
                    key: round(sum(s[key] * w for s, w in scores) / n, 4) for key in ("answer", "value")
                }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
