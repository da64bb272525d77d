"""``rxrt train``: run the supervised curriculum (stages 0-4) of a recipe into an output directory."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an RxT model with a recipe (tokenizer, joint LM, SFT, memory pre-training, memory-aware)",
    )
    p.add_argument("--recipe", required=True, help="a built-in recipe name (nano, ci) or a recipe .json file")
    p.add_argument("--out", required=True, help="output directory (checkpoints, logs, the final model in OUT/model)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--threads", type=int, help="torch threads (default: the recipe's; recorded in summary.json)")
    p.add_argument(
        "--stop-after", type=int, metavar="STEPS", help="stop after this many training steps (continue with --resume)"
    )
    p.add_argument(
        "--start-from",
        metavar="STAGE_DIR",
        help="pilots only: begin with the weights and tokenizer of another run's stage directory "
        "(e.g. RUN/stage3-memory-pretrain) and skip that stage and those before it",
    )
    p.add_argument(
        "--init-from",
        metavar="MODEL_DIR",
        help="where the weights a continuing recipe starts from are (its init_from names them; "
        "their SHA-256 must be the recipe's init_sha256)",
    )
    p.add_argument(
        "--recompute",
        nargs="?",
        const=1,
        default=0,
        type=int,
        metavar="TURNS",
        help="backbone recipes: keep one turn's activations, recomputing each turn in the backward pass "
        "(the same weights; each turn's forward runs twice; a fraction of the memory: long dialogues fit in RAM); "
        "with TURNS, only in the steps whose dialogues have at least that many turns (shorter ones fit anyway)",
    )
    p.add_argument(
        "--export",
        metavar="MODEL_DIR",
        help="train nothing: write the run in --out as of its newest checkpoint as a model directory "
        "(as the finished run writes OUT/model), to probe a run mid-way; the run may go on meanwhile",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars (or, where stderr is not a terminal, no line per log window), only stage summaries",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from rxruntime.training.recipe import RecipeError, load_recipe
    from rxruntime.training.trainer import Trainer

    if args.threads is not None and args.threads < 1:
        raise RecipeError(f"--threads must be >= 1, got {args.threads}")
    if args.recompute < 0:
        raise RecipeError(f"--recompute TURNS must be >= 1, got {args.recompute}")
    if args.stop_after is not None and args.stop_after < 0:
        raise RecipeError(f"--stop-after must be >= 0, got {args.stop_after}")
    recipe = load_recipe(args.recipe)
    console = Console(stderr=True)
    if args.export is not None:
        if args.resume or args.stop_after is not None or args.start_from or args.init_from or args.recompute:
            raise RecipeError("--export trains nothing: it takes only --recipe, --out and --threads")
        at = Trainer(recipe, args.out, threads=args.threads).export(args.export)
        console.print(f"{args.export}: the run in {args.out} as of {at.get('stage')} step {at.get('step')}")
        return 0

    def progress() -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=args.quiet,
        )

    trainer = Trainer(
        recipe,
        args.out,
        resume=args.resume,
        stop_after=args.stop_after,
        threads=args.threads,
        start_from=args.start_from,
        init_from=args.init_from,
        recompute=args.recompute,
        progress=progress,
        echo=console.print,
        # a bar needs a terminal; in a file (nohup, CI) each log line is printed instead, unwrapped
        lines=_plain_line if not args.quiet and not console.is_terminal else None,
    )
    finished = trainer.run()
    return 0 if finished else 3


def _plain_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
