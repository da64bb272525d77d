"""Shared argument parsing for the examples: every example runs on the embedded model by default."""

from __future__ import annotations

import argparse

import rxruntime


def engine_from_args(
    description: str, **extra: tuple[type, object, str]
) -> tuple[rxruntime.Engine, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model",
        default="default",
        help="model directory, or a shipped model: 'default' (what rxrt chat opens) or 'small' (the 2.8M model, fast)",
    )
    for name, (kind, default, help_text) in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=help_text)
    args = parser.parse_args()
    return rxruntime.load(args.model), args
