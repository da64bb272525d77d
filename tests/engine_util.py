"""What the engine tests share: a tokenizer corpus, a tiny model, and a stream collector."""

from __future__ import annotations

import threading
from typing import Any

import torch

from rxruntime.events import Event
from rxruntime.models import RxTModel

from .conftest import tiny_config

CORPUS = ["Hi, I'm Ada and my cat is called Pixel. What is my name? Your name is Ada. Paris is sunny."] * 30


def make_model(seed: int = 0) -> RxTModel:
    torch.manual_seed(seed)
    return RxTModel(tiny_config(vocab_size=300, max_seq_len=48)).eval()


def collect(observable: Any, timeout: float = 20.0) -> tuple[list[Event], BaseException | None]:
    """Every event of a stream and its error (None when it completed)."""
    events: list[Event] = []
    error: list[BaseException] = []
    done = threading.Event()

    def on_error(e: Exception) -> None:
        error.append(e)
        done.set()

    observable.subscribe(events.append, on_error, done.set)
    assert done.wait(timeout), "the stream did not finish"
    return events, (error[0] if error else None)


def patch(obj: Any, name: str, fn: Any) -> None:
    """Replace a model method for one test (the model is thrown away afterwards)."""
    setattr(obj, name, fn)
