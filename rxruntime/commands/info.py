"""``rxrt info``: a model's config and parameter counts, for a preset or a model directory."""

from __future__ import annotations

import argparse
import json

from rxruntime.commands import add_model_options


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("info", help="print a model's config and parameter counts")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a named preset: alpha-mini, micro, nano")
    src.add_argument("--model", default="default", help="model directory, hub id, or 'default' (the embedded model)")
    add_model_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from rxruntime.models import RxTModel, preset
    from rxruntime.models.checkpoint import checkpoint_format, load_config, resolve_model_dir, resolve_tokenizer_file
    from rxruntime.models.errors import ConfigError
    from rxruntime.models.tokenizer import RxTokenizer

    tokenizer = None
    if args.preset:
        if args.tokenizer or args.rxlm_version:
            raise ConfigError("--tokenizer and --rxlm-version go with --model, not --preset")
        config = preset(args.preset)
        source = f"preset {args.preset}"
    else:
        directory = resolve_model_dir(args.model)
        config = load_config(directory, args.rxlm_version)
        source = f"{directory}, {checkpoint_format(directory, args.rxlm_version)} format"
        if config.rxlm_version:
            source += f", RxLM {config.rxlm_version}'s numbers"
        if args.tokenizer:
            path = resolve_tokenizer_file(args.tokenizer)
            special = config.special_tokens if config.tokenizer_template != "rxt" else None
            tokenizer = {"path": str(path), "vocab_size": RxTokenizer.from_file(path, special).vocab_size}
    with torch.device("meta"):  # count parameters without allocating them
        model = RxTModel(config)
    counts = model.parameter_counts()
    if args.json:
        out = {"source": source, "parameters": counts, "config": config.to_dict()}
        if tokenizer is not None:
            out["tokenizer"] = tokenizer
        print(json.dumps(out, indent=2))
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
        f"{c.memory_attention.variant} ({c.memory_attention.gate_type} gates) · "
        f"{c.interaction_template} interaction template"
    )
    if tokenizer is not None:
        console.print(f"tokenizer {tokenizer['path']} · {tokenizer['vocab_size']} tokens")
    return 0
