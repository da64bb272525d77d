"""Validation at the edge: every field and option is checked before it reaches the engine."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from rxruntime import Engine, InvalidOptionError
from rxruntime.events import QueryReceived
from rxruntime.serving.client import Client
from rxruntime.serving.zmq import wire
from rxruntime.serving.zmq.errors import ProtocolError
from rxruntime.serving.zmq.wire import Limits

from .serving_util import engine, serving, write_model

LIMITS = Limits(vocab_size=300, max_seq_len=48, max_message_bytes=1 << 16)
ODD_VALUES: list[Any] = [
    None,
    True,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    "x",
    "",
    b"\x00",
    [],
    [1, "a"],
    {"a": 1},
    {1: 2},
]
BAD_OPTIONS: list[tuple[str, Any]] = [
    ("top_k", 2**64 - 1),  # once overflowed in a batched prefill and failed 111 other turns
    ("top_k", -1),
    ("top_k", 301),
    ("top_k", 1.0),
    ("top_k", True),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", -0.5),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", "1"),
    ("max_new_tokens", 0),
    ("max_new_tokens", 10**9),
    ("max_new_tokens", 2.0),
    ("remember_partial", 1),
    ("remember_partial", "yes"),
    ("thinking_mode", "auto"),
    ("thinking_mode", 1),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS)
def test_each_bad_option_value_is_a_protocol_error_naming_it(name: str, value: Any) -> None:
    request = {"op": "interact", "rid": 1, "conversation_id": "c", "query": "hi", "options": {name: value}}
    with pytest.raises(ProtocolError) as info:
        wire.validate(request, LIMITS)
    assert info.value.field == f"options.{name}" and name in str(info.value)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"op": "interact", "conversation_id": "c", "query": "hi"}, "rid"),
        ({"op": "interact", "rid": -1, "conversation_id": "c", "query": "hi"}, "rid"),
        ({"op": "interact", "rid": True, "conversation_id": "c", "query": "hi"}, "rid"),
        ({"op": 3, "rid": 1}, "op"),
        ({"op": "interact", "rid": 1, "query": "hi"}, "conversation_id"),
        ({"op": "interact", "rid": 1, "conversation_id": "", "query": "hi"}, "conversation_id"),
        ({"op": "interact", "rid": 1, "conversation_id": "a\x00b", "query": "hi"}, "conversation_id"),
        ({"op": "interact", "rid": 1, "conversation_id": "x" * 129, "query": "hi"}, "conversation_id"),
        ({"op": "interact", "rid": 1, "conversation_id": 5, "query": "hi"}, "conversation_id"),
        ({"op": "interact", "rid": 1, "conversation_id": "c", "query": ""}, "query"),
        ({"op": "interact", "rid": 1, "conversation_id": "c", "query": [1, 300]}, "query"),
        ({"op": "interact", "rid": 1, "conversation_id": "c", "query": [-1]}, "query"),
        ({"op": "interact", "rid": 1, "conversation_id": "c", "query": [True]}, "query"),
        ({"op": "interact", "rid": 1, "conversation_id": "c", "query": [1] * 49}, "query"),
        ({"op": "interact", "rid": 1, "conversation_id": "c", "query": "hi", "options": [1]}, "options"),
        ({"op": "interact", "rid": 1, "conversation_id": "c", "query": "hi", "options": {"temprature": 1}}, "options"),
        ({"op": "interact", "rid": 1, "conversation_id": "c", "query": "hi", "extra": 1}, "extra"),
        ({"op": "cancel", "rid": 1, "target": "3"}, "target"),
        ({"op": "restore", "rid": 1, "state": "not bytes"}, "state"),
        ({"op": "open", "rid": 1, "memory_init": 7}, "memory_init"),
    ],
)
def test_each_bad_field_is_a_protocol_error_naming_it(request_fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.validate(request_fields, LIMITS)
    assert info.value.field == field


def test_fuzzed_requests_only_ever_raise_protocol_error() -> None:
    rng = random.Random(0)
    fields = ["op", "rid", "conversation_id", "query", "options", "target", "state", "memory_init", "zzz"]
    ops = [*wire.SCHEMA, "dance"]
    for _ in range(5000):
        request: dict[Any, Any] = {"op": rng.choice(ops), "rid": rng.choice([1, *ODD_VALUES])}
        for name in rng.sample(fields, rng.randrange(4)):
            request[name] = rng.choice([*ODD_VALUES, {"top_k": rng.choice(ODD_VALUES)}])
        with contextlib.suppress(ProtocolError):  # anything else (a TypeError, a KeyError) fails the test
            wire.validate(request, LIMITS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def served(model_dir: Path) -> Iterator[tuple[Client, Engine, str]]:
    eng = engine(model_dir)
    with serving(eng) as server, Client(server.endpoint, timeout=20) as client:
        yield client, eng, server.endpoint
    eng.close()


def test_rejected_requests_reach_no_engine_and_use_no_turn_number(served: tuple[Client, Engine, str]) -> None:
    client, _, endpoint = served
    conv = client.open("victim")
    neighbour = client.open("neighbour")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(endpoint)
    try:
        for rid, (name, value) in enumerate(BAD_OPTIONS, start=1):
            raw.send(
                msgpack.packb(
                    {"op": "interact", "rid": rid, "conversation_id": "victim", "query": "hi", "options": {name: value}}
                )
            )
            assert raw.poll(10_000)
            reply = msgpack.unpackb(raw.recv(), raw=False)
            assert reply["rid"] == rid and reply["error"]["type"] == "ProtocolError"
            assert reply["error"]["field"] == f"options.{name}"
    finally:
        raw.close(0)
        ctx.term()
    # the bad requests were another connection's; the owner's first real turn is still turn 1
    assert [e.turn for e in _events(conv, "Hi") if isinstance(e, QueryReceived)] == [1]
    with pytest.raises(ProtocolError) as info:  # the owner's own bad request: the same, typed
        conv.ask("Hi", top_k=2**64 - 1)
    assert info.value.field == "options.top_k"
    assert [e.turn for e in _events(conv, "Again") if isinstance(e, QueryReceived)] == [2]
    assert neighbour.ask("Hi", max_new_tokens=2) is not None


def _events(conv: Any, query: str) -> list[Any]:
    import reactivex.operators as ops

    result: list[Any] = conv.interact(query, max_new_tokens=2).pipe(ops.to_list()).run()
    return result


def test_thinking_mode_crosses_the_wire_and_the_engine_judges_it(served: tuple[Client, Engine, str]) -> None:
    """A well-formed mode reaches the engine, which refuses one the model lacks, naming it."""
    client, _, _ = served
    conv = client.open("thinker")
    assert conv.ask("Hi", max_new_tokens=2, thinking_mode="fast") is not None
    with pytest.raises(InvalidOptionError, match="interaction_template='alpha'") as info:  # this model's
        conv.ask("Hi", max_new_tokens=2, thinking_mode="extended")
    assert info.value.field == "thinking_mode"
    assert conv.ask("Hi", max_new_tokens=2) is not None
