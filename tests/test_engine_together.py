"""``Engine.together()``: turns sent inside the block start together, in one prefill, when it
ends; turns under way go on decoding; a block that waits on its own turn is late, never stuck."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from rxruntime import Engine
from rxruntime.errors import InvalidOptionError
from rxruntime.events import AnswerCompleted, Token
from rxruntime.models import DecodeBatch, RxTModel, RxTokenizer

from .conftest import tiny_config


@pytest.fixture
def engine(tok: RxTokenizer) -> Iterator[Engine]:
    torch.manual_seed(0)
    eng = Engine(RxTModel(tiny_config(vocab_size=300, max_seq_len=64)).eval(), tok, max_batch=16)
    yield eng
    eng.close()


@pytest.fixture
def joins(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every ``DecodeBatch.join``, in order."""
    rows: list[int] = []
    real = DecodeBatch.join

    def join(self: DecodeBatch, requests: Any) -> torch.Tensor:
        rows.append(len(requests))
        return real(self, requests)

    monkeypatch.setattr(DecodeBatch, "join", join)
    return rows


class Answers:
    """Collects each turn's first-token time and its completion."""

    def __init__(self, count: int) -> None:
        self.first: list[float | None] = [None] * count
        self.done = [threading.Event() for _ in range(count)]

    def observer(self, i: int) -> tuple[Any, Any, Any]:
        def on_next(event: Any) -> None:
            if isinstance(event, Token) and self.first[i] is None:
                self.first[i] = time.monotonic()
            if isinstance(event, AnswerCompleted):
                self.done[i].set()

        return on_next, lambda exc: self.done[i].set(), lambda: self.done[i].set()

    def wait(self) -> None:
        assert all(d.wait(30) for d in self.done), "a turn never finished"


def test_a_burst_sent_together_starts_in_one_join_when_the_block_ends(engine: Engine, joins: list[int]) -> None:
    convs = [engine.conversation(f"b{i}") for i in range(8)]
    answers = Answers(len(convs))
    with engine.together():
        subs = [c.interact("Hi there", max_new_tokens=3).subscribe(*answers.observer(i)) for i, c in enumerate(convs)]
        time.sleep(0.3)  # without the hold, the first turns would have joined and decoded by now
        assert joins == [] and all(f is None for f in answers.first)
        assert engine.queue_depth == len(convs)
        released = time.monotonic()
    answers.wait()
    assert joins == [len(convs)]
    assert all(f is not None and f >= released for f in answers.first)
    for s in subs:
        s.dispose()


def test_turns_under_way_keep_decoding_while_new_ones_are_held(engine: Engine, joins: list[int]) -> None:
    long = engine.conversation("long")
    running = Answers(1)
    long.interact("Tell me more", max_new_tokens=40).subscribe(*running.observer(0))
    deadline = time.monotonic() + 10
    while running.first[0] is None and time.monotonic() < deadline:
        time.sleep(0.005)
    held = Answers(1)
    with engine.together(max_wait=30):
        engine.conversation("held").interact("Hi", max_new_tokens=2).subscribe(*held.observer(0))
        running.wait()  # the running turn finishes inside the block: it was not held
        assert held.first[0] is None and not held.done[0].is_set()
    held.wait()
    assert joins == [1, 1]


def test_a_block_that_waits_on_its_own_turn_is_late_not_stuck(engine: Engine) -> None:
    conv = engine.conversation("self")
    start = time.monotonic()
    with engine.together(max_wait=0.3):
        answer = conv.ask("Hi", max_new_tokens=2, timeout=30)
    assert isinstance(answer, str)
    assert time.monotonic() - start >= 0.3  # admitted when the hold lapsed


def test_holds_nest_and_admission_resumes_after_the_outer_one(engine: Engine, joins: list[int]) -> None:
    convs = [engine.conversation(f"n{i}") for i in range(3)]
    answers = Answers(3)
    with engine.together():
        convs[0].interact("Hi", max_new_tokens=2).subscribe(*answers.observer(0))
        with engine.together():
            convs[1].interact("Hi", max_new_tokens=2).subscribe(*answers.observer(1))
        time.sleep(0.2)
        assert joins == []  # the inner block's end did not release the outer hold
        convs[2].interact("Hi", max_new_tokens=2).subscribe(*answers.observer(2))
    answers.wait()
    assert joins == [3]


def test_a_lapsed_hold_still_open_does_not_cancel_a_new_one(engine: Engine, joins: list[int]) -> None:
    convs = [engine.conversation(f"l{i}") for i in range(2)]
    answers = Answers(2)
    with engine.together(max_wait=0.05):
        time.sleep(0.2)  # this hold has lapsed, its block is still open
        with engine.together(max_wait=30):
            for i, c in enumerate(convs):
                c.interact("Hi", max_new_tokens=2).subscribe(*answers.observer(i))
            time.sleep(0.3)
            assert joins == []  # the new hold holds
    answers.wait()
    assert joins == [2]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_a_bad_max_wait_is_refused_before_anything_is_held(engine: Engine, bad: Any) -> None:
    with pytest.raises(InvalidOptionError, match="max_wait"), engine.together(max_wait=bad):
        pass
    assert engine.conversation("after").ask("Hi", max_new_tokens=2, timeout=30)  # nothing left held


def test_an_error_inside_the_block_releases_the_hold(engine: Engine) -> None:
    conv = engine.conversation("err")
    with pytest.raises(RuntimeError, match="boom"), engine.together(max_wait=30):
        raise RuntimeError("boom")
    start = time.monotonic()
    conv.ask("Hi", max_new_tokens=2, timeout=30)
    assert time.monotonic() - start < 20  # not the 30 s hold
