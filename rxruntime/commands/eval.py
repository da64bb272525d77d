"""``rxrt eval memory``: how well a model recalls what it was told k turns later, with and without its STM.

Two suites: ``people`` (default; facts told in varied words with endless values, scored per split,
``training/people_eval.py``) and ``templates`` (the original MRQbench-style probes on the
nano training templates, ``training/mrqbench.py``; kept so older figures stay reproducible).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rxruntime.commands import add_model_options


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model")
    tasks = p.add_subparsers(dest="task", required=True)
    m = tasks.add_parser(
        "memory",
        help="memory retention: recall a fact k = 1..8 turns later, with memory vs STM reset every turn, per split",
    )
    m.add_argument("--model", default="default", help="model directory, hub id, or 'default' (the embedded model)")
    add_model_options(m)
    m.add_argument(
        "--suite",
        choices=("people", "templates"),
        default="people",
        help="people: varied phrasings and endless values, per split (default); "
        "templates: the MRQbench-style probes on the nano training templates",
    )
    m.add_argument(
        "--dialogues", type=int, help="probe dialogues per gap k and split (default 50 for people, 100 for templates)"
    )
    m.add_argument("--max-gap", type=int, default=8, help="largest gap k (default 8)")
    m.add_argument(
        "--splits", help="people suite: comma-separated splits (default: all, the hand-written one included)"
    )
    m.add_argument("--seed", type=int, help="benchmark seed (default: the suite's fixed seed)")
    m.add_argument("--no-hard", action="store_true", help="templates suite: skip the split of values never trained on")
    m.add_argument("--threads", type=int, help="torch threads")
    m.add_argument(
        "--weights",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="evaluate with the weights rounded to this CPU format (docs/benchmarks.md §8; default fp32)",
    )
    m.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="dialogues decoded together (default 256); on a CPU the C decode step runs batches of up to 16, "
        "larger ones the torch step (int8: the C step also rounds activations, so use 16 to evaluate it)",
    )
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=run_memory)


def run_memory(args: argparse.Namespace) -> int:
    import torch

    from rxruntime.models import load_pretrained
    from rxruntime.models.errors import ConfigError
    from rxruntime.training.people_eval import EVAL_SPLITS

    dialogues = args.dialogues if args.dialogues is not None else (50 if args.suite == "people" else 100)
    if dialogues < 1 or args.max_gap < 1 or args.batch_size < 1:
        raise ConfigError("--dialogues, --max-gap and --batch-size must be >= 1")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else list(EVAL_SPLITS)
    unknown = sorted(set(splits) - set(EVAL_SPLITS))
    if unknown or not splits:
        raise ConfigError(f"unknown split(s) {unknown or args.splits!r}; known: {', '.join(EVAL_SPLITS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model, tokenizer=args.tokenizer, rxlm_version=args.rxlm_version)
    assert tokenizer is not None
    from rxruntime.models.weight_format import set_weight_format

    set_weight_format(model, args.weights)
    gaps = list(range(1, args.max_gap + 1))
    if args.suite == "people":
        return _people(args, model, tokenizer, dialogues, gaps, splits)
    return _templates(args, model, tokenizer, dialogues, gaps)


def _people(
    args: argparse.Namespace, model: Any, tokenizer: Any, dialogues: int, gaps: list[int], splits: list[str]
) -> int:
    from rxruntime.training.people_eval import BENCH_SEED, evaluate, mean

    seed = BENCH_SEED if args.seed is None else args.seed
    with _reporting("eval memory") as progress:
        result = evaluate(
            model,
            tokenizer,
            per_gap=dialogues,
            gaps=gaps,
            splits=splits,
            seed=seed,
            batch_size=args.batch_size,
            progress=progress,
        )
    result["model"] = str(args.model)
    result["suite"] = "people"
    result["weights"] = args.weights
    result["batch_size"] = args.batch_size
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"memory: exact answer k turns after the fact, with memory / STM reset ({args.model})")
    table.add_column("split")
    for k in gaps:
        table.add_column(f"k={k}", justify="right")
    table.add_column("mean", justify="right")
    per_split = result["splits"]
    assert isinstance(per_split, dict)
    for split, scores in per_split.items():
        rows = [(split, scores)]
        if "value_in_answer" in scores:  # hand_written: also any answer that says the value
            rows.append((f"{split}: value in answer", scores["value_in_answer"]))
        for name, row in rows:
            with_m, reset = row["with_memory"], row["reset_memory"]
            cells = [f"{with_m[str(k)]:.0%} / {reset[str(k)]:.0%}" for k in gaps]
            table.add_row(name, *cells, f"{mean(with_m):.0%} / {mean(reset):.0%}")
    console = Console()
    console.print(table)
    console.print(f"{dialogues} dialogues per k and split (hand_written: its 48 items at most), benchmark seed {seed}")
    return 0


@contextmanager
def _reporting(label: str) -> Iterator[Callable[[int, int], None]]:
    """Progress on stderr for a run of many minutes: a bar on a terminal; elsewhere (a file, CI)
    a line at every tenth of the dialogues, with the time so far and the time left at that pace."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if console.is_terminal:
        columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(TextColumn(label), *columns, console=console, transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    start, shown = time.perf_counter(), [0]

    def line(done: int, total: int) -> None:
        if done * 10 // total > shown[0] or done == total:
            shown[0] = done * 10 // total
            spent = time.perf_counter() - start
            left = spent / done * (total - done)
            text = f"{label}: {done}/{total} dialogues, {spent:.0f} s, about {left:.0f} s left"
            print(text, file=sys.stderr, flush=True)

    yield line


def _templates(args: argparse.Namespace, model: Any, tokenizer: Any, dialogues: int, gaps: list[int]) -> int:
    from rxruntime.training.mrqbench import BENCH_SEED, benchmark

    seed = BENCH_SEED if args.seed is None else args.seed
    result = benchmark(
        model, tokenizer, per_gap=dialogues, gaps=gaps, seed=seed, hard=not args.no_hard, batch_size=args.batch_size
    )
    result["model"] = str(args.model)
    result["suite"] = "templates"
    result["weights"] = args.weights
    result["batch_size"] = args.batch_size
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"memory retention (templates): exact recall k turns after the fact ({args.model})")
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
    console.print(f"{result['dialogues']} dialogues per setting ({dialogues} per k), benchmark seed {seed}")
    return 0
