"""The ``rxrt`` command line: info, chat, serve, train, bench, eval.

Each subcommand lives in its own module and is imported only when run, so ``rxrt info`` does not
pay for importing the server or the trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rxruntime.models.errors import RxTError


def _info(args: argparse.Namespace) -> int:
    import torch

    from rxruntime.models import RxTModel, preset
    from rxruntime.models.checkpoint import load_config, resolve_model_dir

    if args.preset:
        config = preset(args.preset)
        source = f"preset {args.preset}"
    else:
        directory = resolve_model_dir(args.model)
        config = load_config(directory)
        source = str(directory)
    with torch.device("meta"):  # count parameters without allocating them
        model = RxTModel(config)
    counts = model.parameter_counts()
    if args.json:
        print(json.dumps({"parameters": counts, "config": config.to_dict()}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"RxT model ({source})")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    for name, n in counts.items():
        table.add_row(name, f"{n:,} ({n / 1e6:.2f}M)")
    table.add_row("active per token", f"{model.active_parameter_count():,}")
    console.print(table)
    c = config
    console.print(
        f"dim {c.dim} · layers {c.num_layers} · STM {c.num_layers}x{c.stm_size} slots · "
        f"vocab {c.vocab_size} · interaction {c.max_seq_len} tokens · memory attention "
        f"{c.memory_attention.variant} ({c.memory_attention.gate_type} gates)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rxrt", description="Reactive Transformer runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a model's config and parameter counts")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a named preset: alpha-mini, micro, nano")
    src.add_argument("--model", default="default", help="model directory, hub id, or 'default'")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RxTError as exc:
        print(f"rxrt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
