"""One module per ``rxrt`` subcommand. Each defines ``register(subparsers)``, which adds its parser
and sets ``func`` (a callable taking the parsed args and returning an exit code). Heavy imports
happen inside ``func``, so ``rxrt info`` does not pay for the trainer or the server."""

from __future__ import annotations

import argparse
import importlib

# Order is the order of `rxrt --help`.
COMMANDS = ["chat", "serve", "keygen", "info", "convert", "train", "eval", "bench"]


def register_all(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name in COMMANDS:
        importlib.import_module(f"rxruntime.commands.{name}").register(subparsers)
