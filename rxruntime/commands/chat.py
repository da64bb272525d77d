"""``rxrt chat``: talk to a model in the terminal (the embedded default model unless told otherwise)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rxruntime.commands import add_model_options

if TYPE_CHECKING:
    from rich.console import Console


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument(
        "--model",
        default="default",
        help="model directory, hub id, or a shipped model: 'default' (SmolLM2-135M-Instruct with an RxT memory; "
        "its first start downloads and caches the backbone) or 'small' (the 2.8M one)",
    )
    add_model_options(p)
    p.add_argument("--preset", help="chat with a randomly initialised preset instead (its answers are noise)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    for name in ("presence", "frequency"):
        p.add_argument(
            f"--{name}-penalty",
            type=float,
            default=None,
            help=f"{name} penalty in [-2, 2], OpenAI's meaning; 0 is off (default: the model's config.json, "
            "0 if it sets none; the default model's is 0.5: greedy, it loops a sentence without one)",
        )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="cap on answer length (default: the model's answer_tokens if its config has one, else what fits)",
    )
    p.add_argument(
        "--memory-init",
        "--system",
        dest="memory_init",
        default=None,
        help="a system text written to memory before the first turn (RxT-Beta: its system prompt template)",
    )
    p.add_argument(
        "--thinking",
        choices=("fast", "extended"),
        default=None,
        help="thinking mode of every turn: fast answers at once; extended (RxT-Beta models) thinks first",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--conversation-id", default=None, help="name of the conversation (default: random)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the starting memory, for a session that replays the same (default: drawn from the id)",
    )
    p.add_argument(
        "--weights",
        choices=("fp32", "bf16", "int8"),
        default=None,
        help="CPU weight format for decoding: fp32, bf16 or int8 (default: int8 where the C step runs the model,"
        " fp32 for RxLM checkpoints)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    import rxruntime
    from rxruntime.engine import Engine
    from rxruntime.models import RxTModel, preset
    from rxruntime.models.checkpoint import default_model_dir
    from rxruntime.models.errors import MissingCheckpointFileError
    from rxruntime.models.tokenizer import RxTokenizer
    from rxruntime.options import check_options
    from rxruntime.repl import ChatREPL

    console = Console(highlight=False)
    notice = None
    engine: Engine
    if args.preset is None:
        try:
            with _first_load_said(console):
                engine = rxruntime.load(
                    args.model,
                    device=args.device,
                    weights=args.weights,
                    tokenizer=args.tokenizer,
                    rxlm_version=args.rxlm_version,
                )
        except MissingCheckpointFileError:
            if args.model != "default" or (default_model_dir() / "config.json").exists():
                raise
            args.preset = "nano"  # the package was built without its trained model
    if args.preset is not None:
        torch.manual_seed(0)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = RxTModel(preset(args.preset)).to(device).eval()
        tokenizer = RxTokenizer.train([_SAMPLE_TEXT], vocab_size=min(model.config.vocab_size, 512))
        engine = Engine(model, tokenizer)
        notice = (
            f"Notice: this is a randomly initialised '{args.preset}' model, not a trained one; its answers "
            "are noise. Train one with `rxrt train` or pass --model DIR."
        )
    history = Path(os.environ.get("RXRT_HISTORY", Path.home() / ".rxrt_history"))
    with engine:
        given = {"presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty}
        penalties = {name: value for name, value in given.items() if value is not None}
        if args.thinking is not None or penalties:  # refused here, not at every turn
            check_options(
                engine.default_sampling,
                engine.vocab_size,
                {"thinking_mode": args.thinking, **penalties},
                engine.tokenizer.interaction_template,
            )
        conv = engine.conversation(args.conversation_id, memory_init=args.memory_init, seed=args.seed)
        repl = ChatREPL(
            engine,
            conv,
            console,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            thinking_mode=args.thinking,
            options=penalties,
            history_file=history,
            notice=notice,
        )
        return repl.run()


@contextmanager
def _first_load_said(console: Console) -> Iterator[None]:
    """Show what loading logs (the first start of a model with a backbone downloads and
    dequantizes it, tens of seconds once), so a first `rxrt chat` does not sit silent."""

    class Say(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            console.print(f"[dim]{record.getMessage()}[/dim]", soft_wrap=True)

    logger = logging.getLogger("rxruntime.models")
    handler, level = Say(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


_SAMPLE_TEXT = (
    "Hello! My name is Ada and I live in Paris. What is your name? I like green tea, long walks and my cat. "
    "The quick brown fox jumps over the lazy dog. 0123456789"
)
