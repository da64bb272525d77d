"""One module per ``rxrt`` subcommand. Each defines ``register(subparsers)``, which adds its parser
and sets ``func`` (a callable taking the parsed args and returning an exit code). Heavy imports
happen inside ``func``, so ``rxrt info`` does not pay for the trainer or the server."""

from __future__ import annotations

import argparse
import importlib
import re
from decimal import Decimal
from typing import TypedDict

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


class EngineOptions(TypedDict):
    """The keywords of ``Engine`` (and ``rxruntime.load``) that ``rxrt serve`` takes as flags."""

    max_memory_batch: int
    max_resident_bytes: int | None
    store_writers: int


ENGINE_DEFAULTS = EngineOptions(max_memory_batch=32, max_resident_bytes=None, store_writers=4)
"""``Engine``'s own defaults for these (a test holds them equal to ``Engine.__init__``'s)."""


def _units() -> dict[str, int]:
    units = {"": 1, "b": 1}
    for power, letter in enumerate("kmgt", start=1):
        units[letter] = units[f"{letter}ib"] = 1024**power  # K, KiB: binary, as GNU coreutils and docker
        units[f"{letter}b"] = 1000**power  # KB: decimal, as GNU coreutils and disk makers
    return units


_UNITS = _units()
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A byte count from ``4096``, ``512MiB``, ``4GB`` or ``2G``: ``KiB``/``MiB``/``GiB``/``TiB`` and
    the bare ``K``/``M``/``G``/``T`` are powers of 1024, ``KB``/``MB``/``GB``/``TB`` powers of 1000
    (units in any case). Refuses anything else, and sizes under one byte or not whole bytes, with an
    ``ArgumentTypeError`` (argparse names the flag)."""
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: a number of bytes, or one with a unit such as 512MiB, 4GB or 2G "
            "(K/KiB, M/MiB, G/GiB, T/TiB: powers of 1024; KB, MB, GB, TB: powers of 1000)"
        )
    size = Decimal(match.group(1)) * unit
    if size != size.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is {size} bytes: not a whole number of bytes")
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 bytes")
    return int(size)


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse ``type``): a clear error, naming the flag, for anything else."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The engine's memory options (docs/api.md, "Bounds"), on every command that serves an engine."""
    group = p.add_argument_group("engine memory (docs/api.md, 'Bounds')")
    group.add_argument(
        "--max-memory-batch",
        type=positive_int,
        default=ENGINE_DEFAULTS["max_memory_batch"],
        metavar="N",
        help="memory updates run together as one batch at most (default %(default)s; a batch's activations "
        "grow with it, about 0.2 GB per conversation at RxT-Beta's size)",
    )
    group.add_argument(
        "--max-resident-bytes",
        type=parse_size,
        default=ENGINE_DEFAULTS["max_resident_bytes"],
        metavar="SIZE",
        help="bytes of STMs kept in memory, e.g. 512MiB, 4GB, 2G (1024**3); the least recently used idle "
        "conversations beyond it are evicted and resume from --store (default: no limit)",
    )
    group.add_argument(
        "--store-writers",
        type=positive_int,
        default=ENGINE_DEFAULTS["store_writers"],
        metavar="N",
        help="threads writing committed STMs to --store, so a slow write holds back its own conversation "
        "only (default %(default)s)",
    )


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The engine keywords that :func:`add_engine_options` parsed."""
    return EngineOptions(
        max_memory_batch=args.max_memory_batch,
        max_resident_bytes=args.max_resident_bytes,
        store_writers=args.store_writers,
    )


def register_all(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name in COMMANDS:
        importlib.import_module(f"rxruntime.commands.{name}").register(subparsers)
