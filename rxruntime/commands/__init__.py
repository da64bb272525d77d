"""One module per ``rxrt`` subcommand. Each defines ``register(subparsers)``, which adds its parser
and sets ``func`` (a callable taking the parsed args and returning an exit code). Heavy imports
happen inside ``func``, so ``rxrt info`` does not pay for the trainer or the server."""

from __future__ import annotations

import argparse
import importlib

# Order is the order of `rxrt --help`.
COMMANDS = ["chat", "serve", "keygen", "info", "convert", "train", "eval", "bench"]


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--tokenizer`` and ``--rxlm-version``, beside ``--model`` on every command that loads one."""
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR|FILE|HUB_ID",
        help="tokenizer.json from elsewhere, for checkpoints published without one (RxT-Beta's: ReactiveAI/RxT-Beta)",
    )
    p.add_argument(
        "--rxlm-version",
        default=None,
        metavar="VERSION",
        help="RxLM checkpoints: the RxLM release whose numbers to reproduce, e.g. 0.3.80 (default: the newest "
        "rxruntime knows of the checkpoint's line, 0.3.93 for RxLM 0.3 checkpoints)",
    )


def register_all(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name in COMMANDS:
        importlib.import_module(f"rxruntime.commands.{name}").register(subparsers)
