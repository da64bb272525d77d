"""``rxrt keygen``: CURVE keys for ``rxrt serve --keys`` and ``Client(keys=...)`` (docs/protocol.md)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("keygen", help="write CURVE keys: a server keypair and client keypairs")
    p.add_argument("dir", help="folder for the keys (created; an existing server keypair is kept)")
    p.add_argument(
        "--clients",
        nargs="+",
        default=["client"],
        metavar="NAME",
        help="one keypair per client name (default: %(default)s); run again to add clients",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rxruntime.serving.zmq.curve import generate_keys

    root = Path(args.dir)
    written = generate_keys(root, args.clients)
    for path in written:
        print(path)
    print(f"serve with: rxrt serve --keys {root}")
    for name in args.clients:
        print(f"client {name}: Client(address, keys=ClientKeys.load({str(root)!r}, {name!r}))")
    return 0
