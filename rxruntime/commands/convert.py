"""``rxrt convert SRC DST``: write a model directory (an RxLM checkpoint, say) in our own format.

Not needed to run an RxLM checkpoint (every command loads one as it is); it gives a directory
whose config.json names every architecture choice and whose weights carry their SHA-256. Both
load to the same numbers (tests/test_rxlm_cli.py).

``--compact`` writes a model trained around a pretrained backbone (the ``smol`` recipes) with its
trained tensors only and a reference to the backbone's GGUF (``models/backbone_store.py``); it
loads to the same tensors and logits as the full directory (tests/test_backbone_store.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rxruntime.commands import add_model_options


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("convert", help="write a model directory (e.g. an RxLM checkpoint) in rxruntime's format")
    p.add_argument("src", help="model directory (ours or RxLM's) or hub id")
    p.add_argument("dst", help="output directory (created; existing model files are replaced)")
    add_model_options(p)  # the tokenizer and the RxLM release's numbers are written into DST
    p.add_argument(
        "--compact",
        action="store_true",
        help="a model built around a pretrained backbone: keep only the tensors that differ from the backbone, "
        "and name the backbone (its GGUF's sha256 and size) in config.json; loading fetches and merges it",
    )
    p.add_argument(
        "--backbone",
        default=None,
        metavar="GGUF",
        help="--compact: the backbone's GGUF file (default: SmolLM2's, from the backbone cache or downloaded)",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32", "int8", "keep"),
        default="bfloat16",
        help="--compact: the dtype of the kept (trained) tensors (default bfloat16; int8: the matrices as the "
        "CPU runtime's q8_0 values and scales, the rest float32; keep: as in SRC)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rxruntime.models.checkpoint import checkpoint_format, load_pretrained, resolve_model_dir, save_pretrained

    source = resolve_model_dir(args.src)
    if args.compact:
        return _compact(args, source)
    if args.backbone is not None:
        print("error: --backbone is for --compact")
        return 2
    model, tokenizer = load_pretrained(source, tokenizer=args.tokenizer, rxlm_version=args.rxlm_version)
    dst = Path(args.dst)
    if dst.resolve() == source.resolve():
        print("error: DST must differ from SRC")
        return 2
    save_pretrained(model, dst, tokenizer=tokenizer)
    origin = checkpoint_format(source, args.rxlm_version)
    if model.config.rxlm_version:
        origin += f", RxLM {model.config.rxlm_version}'s numbers"
    print(f"wrote {dst} (rxruntime format) from {source} ({origin})")
    return 0


def _compact(args: argparse.Namespace, source: Path) -> int:
    from rxruntime.models.compact import save_compact

    if args.tokenizer is not None or args.rxlm_version is not None:
        print("error: --compact converts our own full directories; --tokenizer/--rxlm-version do not apply")
        return 2
    dst = Path(args.dst)
    if dst.exists() and dst.resolve() == source.resolve():
        print("error: DST must differ from SRC")
        return 2
    report = save_compact(source, dst, args.backbone, None if args.dtype == "keep" else args.dtype)
    b = report.backbone
    print(
        f"wrote {dst} (compact): {report.kept} trained tensors ({report.kept_parameters:,} parameters, "
        f"{report.weights_bytes / 1e6:.1f} MB), {report.left_out} left out as the backbone's "
        f"({b.file}, sha256 {b.sha256[:12]}..., {b.dtype})"
    )
    return 0
