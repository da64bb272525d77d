"""Shared by the serving tests: a tiny served model, engines on it, servers and clients on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from rxruntime import Engine
from rxruntime.models import RxTModel, RxTokenizer, load_pretrained, save_pretrained
from rxruntime.serving.client import Client
from rxruntime.serving.zmq.server import Server
from rxruntime.stores import STMStore

from .conftest import tiny_config

CORPUS = ["Hi, I'm Ada and my cat is called Pixel. What is my name? Your name is Ada."] * 30


def write_model(path: Path) -> Path:
    torch.manual_seed(0)
    save_pretrained(
        RxTModel(tiny_config(vocab_size=300, max_seq_len=48)), path, tokenizer=RxTokenizer.train(CORPUS, vocab_size=300)
    )
    return path


def engine(model_dir: Path, store: STMStore | None = None) -> Engine:
    model, tok = load_pretrained(model_dir)
    assert tok is not None
    return Engine(model, tok, store=store)


@contextlib.contextmanager
def serving(eng: Engine, **server_options: object) -> Iterator[Server]:
    server = Server(eng, "tcp://127.0.0.1:*", **server_options).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_process(model_dir: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    """``rxrt serve`` in a child process (to kill it -9)."""
    command = [sys.executable, "-m", "rxruntime.cli", "serve", "--model", str(model_dir)]
    return subprocess.Popen(
        [*command, "--bind", f"tcp://127.0.0.1:{port}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_served(address: str, timeout: float = 120.0, **client_options: object) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client(address, timeout=5, **client_options) as client:  # type: ignore[arg-type]
                client.ping()
                return
        except (TimeoutError, ConnectionError):
            if time.monotonic() > deadline:
                raise
