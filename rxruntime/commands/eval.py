"""``rxrt eval memory``: how well a model recalls facts k turns later, with and without its STM."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model")
    tasks = p.add_subparsers(dest="task", required=True)
    m = tasks.add_parser(
        "memory",
        help="MRQbench-style retention: recall a fact k = 1..8 turns later, with memory vs STM reset every turn",
    )
    m.add_argument("--model", default="default", help="model directory, hub id, or 'default' (the embedded model)")
    m.add_argument("--dialogues", type=int, default=100, help="probe dialogues per gap k and split (default 100)")
    m.add_argument("--max-gap", type=int, default=8, help="largest gap k (default 8)")
    m.add_argument("--seed", type=int, help="benchmark seed (default: the fixed benchmark seed)")
    m.add_argument("--no-hard", action="store_true", help="skip the split whose values never occur in training")
    m.add_argument("--threads", type=int, help="torch threads")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=run_memory)


def run_memory(args: argparse.Namespace) -> int:
    import torch

    from rxruntime.models import load_pretrained
    from rxruntime.models.errors import ConfigError
    from rxruntime.models.training.mrqbench import BENCH_SEED, benchmark

    if args.dialogues < 1 or args.max_gap < 1:
        raise ConfigError("--dialogues and --max-gap must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model)
    assert tokenizer is not None
    seed = BENCH_SEED if args.seed is None else args.seed
    gaps = list(range(1, args.max_gap + 1))
    result = benchmark(model, tokenizer, per_gap=args.dialogues, gaps=gaps, seed=seed, hard=not args.no_hard)
    result["model"] = str(args.model)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"memory retention: exact recall k turns after the fact ({args.model})")
    table.add_column("k", justify="right")
    table.add_column("with memory", justify="right")
    table.add_column("STM reset", justify="right")
    table.add_column("gain", justify="right")
    hard = result.get("hard")
    if isinstance(hard, dict):
        table.add_column("hard: with memory", justify="right")
        table.add_column("hard: STM reset", justify="right")
    with_m, reset = result["with_memory"], result["reset_memory"]
    assert isinstance(with_m, dict) and isinstance(reset, dict)
    for k in with_m:
        row = [k, f"{with_m[k]:.0%}", f"{reset[k]:.0%}", f"{(with_m[k] - reset[k]) * 100:+.0f} pts"]
        if isinstance(hard, dict):
            row += [f"{hard['with_memory'][k]:.0%}", f"{hard['reset_memory'][k]:.0%}"]
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"{result['dialogues']} dialogues per setting ({args.dialogues} per k), benchmark seed {seed}")
    return 0
