"""``rxrt convert SRC DST``: write a model directory (an RxLM checkpoint, say) in our own format.

Not needed to run an RxLM checkpoint (every command loads one as it is); it gives a directory
whose config.json names every architecture choice and whose weights carry their SHA-256. Both
load to the same numbers (tests/test_rxlm_cli.py).
"""

from __future__ import annotations

import argparse

from rxruntime.commands import add_model_options


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("convert", help="write a model directory (e.g. an RxLM checkpoint) in rxruntime's format")
    p.add_argument("src", help="model directory (ours or RxLM's) or hub id")
    p.add_argument("dst", help="output directory (created; existing model files are replaced)")
    add_model_options(p)  # the tokenizer and the RxLM release's numbers are written into DST
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rxruntime.models.checkpoint import checkpoint_format, load_pretrained, resolve_model_dir

    source = resolve_model_dir(args.src)
    model, tokenizer = load_pretrained(source, tokenizer=args.tokenizer, rxlm_version=args.rxlm_version)
    dst = Path(args.dst)
    if dst.resolve() == source.resolve():
        print("error: DST must differ from SRC")
        return 2
    model.save_pretrained(dst, tokenizer=tokenizer)
    origin = checkpoint_format(source, args.rxlm_version)
    if model.config.rxlm_version:
        origin += f", RxLM {model.config.rxlm_version}'s numbers"
    print(f"wrote {dst} (rxruntime format) from {source} ({origin})")
    return 0
