"""The ``rxrt`` command line. Subcommands live in :mod:`rxruntime.commands`, one module each."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rxruntime.commands import register_all
from rxruntime.models.errors import RxTError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rxrt", description="Reactive Transformer runtime")
    register_all(parser.add_subparsers(dest="command", required=True))
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
