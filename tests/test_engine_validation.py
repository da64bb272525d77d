"""Checks at the engine's door: every option value by type and range (InvalidOptionError naming
the field), token ids before decoding, and a refused query uses no turn number."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from rxruntime import (
    AnswerCompleted,
    Engine,
    InteractionFailed,
    InvalidOptionError,
    InvalidTokenError,
    QueryReceived,
    QueryTooLongError,
    SamplingParams,
)
from rxruntime.backend import TurnRequest
from rxruntime.models import RxTModel, RxTokenizer

from .conftest import tiny_config
from .engine_util import collect, in_one_prefill


@pytest.fixture
def engine(tok: RxTokenizer) -> Iterator[Engine]:
    torch.manual_seed(0)
    eng = Engine(RxTModel(tiny_config(vocab_size=300, max_seq_len=48)).eval(), tok)
    yield eng
    eng.close()


BAD_OPTIONS = [
    ("temperature", "hot"),
    ("temperature", -0.5),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", True),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", "10"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("top_p", [0.5]),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.0),
    ("max_new_tokens", 0),
    ("max_new_tokens", -3),
    ("max_new_tokens", "5"),
    ("max_new_tokens", False),
    ("remember_partial", "yes"),
    ("remember_partial", 1),
    ("colour", "blue"),
]


@pytest.mark.parametrize(("field", "value"), BAD_OPTIONS)
def test_every_bad_option_is_refused_naming_its_field(engine: Engine, field: str, value: object) -> None:
    conv = engine.conversation("o")
    bad: dict[str, Any] = {field: value}
    with pytest.raises(InvalidOptionError) as info:
        conv.interact("Hi", **bad)
    assert info.value.field == field and field in str(info.value)
    with pytest.raises(InvalidOptionError):
        conv.ask("Hi", **bad)
    assert isinstance(info.value, ValueError)  # what a transport maps to its protocol error
    events, error = collect(conv.interact("Hi", max_new_tokens=2))
    assert error is None and events[0].turn == 1  # the refused queries used no turn number


def test_huge_top_k_fails_no_one(engine: Engine) -> None:
    """top_k = 2**64 - 1 means 'no filter'. It once overflowed after the batched prefill and
    failed every row of it."""
    convs = [engine.conversation(f"c{i}") for i in range(6)]
    streams = [c.interact("Hi", max_new_tokens=5) for c in convs[1:]]
    streams.insert(0, convs[0].interact("Hi", max_new_tokens=5, top_k=2**64 - 1, temperature=0.9, seed=7))
    results = in_one_prefill(engine, streams)
    assert [error for _, error in results] == [None] * 6
    assert all(any(isinstance(e, AnswerCompleted) for e in events) for events, _ in results)
    unfiltered = next(e for e in results[0][0] if isinstance(e, AnswerCompleted))
    again = engine.conversation("c0-again", seed=zlib.crc32(b"c0"))
    same = [e for e in collect(again.interact("Hi", max_new_tokens=5, temperature=0.9, seed=7))[0]]
    assert next(e for e in same if isinstance(e, AnswerCompleted)).token_ids == unfiltered.token_ids  # = no filter


def test_sampling_params_with_a_huge_top_k_are_normalised(engine: Engine, tok: RxTokenizer) -> None:
    with Engine(engine.model, tok, default_sampling=SamplingParams(temperature=0.5, top_k=2**64 - 1)) as eng:
        assert eng.default_sampling.top_k == 0
        assert eng.conversation("d").ask("Hi", max_new_tokens=3) is not None


@pytest.mark.parametrize("query", [[5, 9999], [5, -1], [5, 2.0], [5, "x"], [True, 5]])
def test_token_ids_are_checked_before_decoding(engine: Engine, query: list[Any]) -> None:
    conv = engine.conversation("t")
    events, error = collect(conv.interact(query))
    assert isinstance(error, InvalidTokenError)
    assert [type(e) for e in events] == [InteractionFailed]
    assert events[0].turn == 0 and not any(isinstance(e, QueryReceived) for e in events)
    events, error = collect(conv.interact([5, 6], max_new_tokens=2))
    assert error is None and events[0].turn == 1


def test_start_turn_checks_a_direct_request(engine: Engine) -> None:
    """The Backend API itself refuses bad ids and options, whoever calls it."""
    conv = engine.conversation("direct")
    outcome: dict[str, Any] = {}
    done = threading.Event()

    class Listener:
        def on_token(self, token_id: int, position: int, logprobs: Any = None) -> None:
            pass

        def on_answer(self, token_ids: tuple[int, ...], finish_reason: Any, stats: Any) -> None:
            done.set()

        def on_error(self, exc: Exception, stm_version: int) -> None:
            outcome["error"] = exc
            done.set()

    turn = engine.next_turn(conv.id)
    params = SamplingParams(temperature=0.0)
    engine.start_turn(TurnRequest(conv.id, turn, (1, 2, 10**6), params), Listener())
    assert done.wait(10) and isinstance(outcome["error"], InvalidTokenError)
    done.clear()
    turn = engine.next_turn(conv.id)
    assert turn == 1  # the refused request gave its turn number back
    engine.start_turn(TurnRequest(conv.id, turn, (1, 2, 5), params, max_new_tokens=0), Listener())
    assert done.wait(10) and isinstance(outcome["error"], InvalidOptionError)
    assert outcome["error"].field == "max_new_tokens"


def test_too_long_queries_use_no_turn_number(engine: Engine) -> None:
    conv = engine.conversation("long")
    for _ in range(3):
        events, error = collect(conv.interact("Ada " * 100))
        assert isinstance(error, QueryTooLongError) and events[0].turn == 0
    events, error = collect(conv.interact("Hi", max_new_tokens=2))
    assert error is None and {e.turn for e in events} == {1}
