"""Seconds per training step of the ``smol`` recipe (issue 24's plan), stage by stage.

Runs the recipe's own step function (``Trainer._step``: same data, batch size, losses, optimizer)
for a few steps of stage 3 and of stage 4 at given dialogue lengths, and records per step the
wall-clock seconds and the process's CPU seconds, with the load average: on a shared machine the
wall clock says little, the CPU seconds are an upper bound of the work (contention for the memory
bus and caches inflates them too).

    python benchmarks/smol_step_time.py --threads 2 --stage3 2 --turns 2,4,8 --steps 2 \
        --out benchmarks/results/smol-step-time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from rxruntime.training.optim import make_optimizer
from rxruntime.training.recipe import load_recipe, recipe_from_dict
from rxruntime.training.sources import make_source
from rxruntime.training.trainer import Trainer, configure_torch


def _timed(trainer: Trainer, name: str, steps: int, optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    rows = []
    for step in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        result = trainer._step(name, step + 100, optimizer)  # past warm-up: the full learning rate
        rows.append(
            {
                "wall_s": round(time.perf_counter() - wall, 2),
                "cpu_s": round(time.process_time() - cpu, 2),
                "load": round(os.getloadavg()[0], 2),
                "loss": round(result.loss, 4),
            }
        )
        print(name, rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="smol")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stage3", type=int, default=2, help="stage-3 steps to time")
    parser.add_argument("--turns", default="2,8", help="stage-4 dialogue lengths to time")
    parser.add_argument("--steps", type=int, default=2, help="stage-4 steps per dialogue length")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    configure_torch(args.threads)
    recipe = load_recipe(args.recipe)
    assert recipe.model.backbone is not None, "a backbone recipe"
    t0 = time.perf_counter()
    trainer = Trainer(recipe, tempfile.mkdtemp(prefix="smol-step-time-"))
    trainer.model, trainer.tokenizer = recipe.model.backbone.build(recipe.seed)
    trainer.model.train()
    trainer.source = make_source(recipe.data, recipe.seed, recipe.tokenizer.dialogues)
    build_s = time.perf_counter() - t0
    record: dict[str, object] = {
        "recipe": recipe.name,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "build_s": round(build_s, 1),
        "batch_size": {
            "memory_pretrain": recipe.memory_pretrain.batch_size,
            "memory_aware": recipe.memory_aware.batch_size,
        },
    }
    opt = make_optimizer(list(trainer.model.memory_attention.parameters()), recipe.memory_pretrain)
    record["memory_pretrain"] = {
        "turns": recipe.memory_pretrain.turns,
        "steps": _timed(trainer, "memory_pretrain", args.stage3, opt),
    }
    stage4: dict[str, object] = {}
    for turns in [int(t) for t in args.turns.split(",")]:
        spec = recipe.to_dict()
        spec["memory_aware"].update(min_turns=turns, max_turns=turns, ramp_start=0, ramp_end=0, recall_only_until=0)
        spec["memory_aware"].update(unfreeze_memory_attention=0, unfreeze_encoder=0)  # everything trains
        trainer.recipe = recipe_from_dict(spec)
        params = trainer._parameters("memory_aware")
        opt = make_optimizer(params, trainer.recipe.memory_aware)
        stage4[str(turns)] = _timed(trainer, "memory_aware", args.steps, opt)
    record["memory_aware"] = stage4
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
