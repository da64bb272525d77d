"""Events are frozen, typed and survive the msgpack wire form unchanged."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from rxruntime import events
from rxruntime.events import (
    AnswerCompleted,
    Event,
    InteractionFailed,
    MemoryUpdated,
    MemoryUpdateStarted,
    QueryReceived,
    Token,
)

SAMPLES: list[Event] = [
    QueryReceived("c1", 1, "Hi, I'm Ada — 你好", (2, 4, 17, 5)),
    Token("c1", 1, 17, "é", 0),
    Token("c1", 1, 18, "ab", 1, count=2),
    AnswerCompleted("c1", 1, "Hello Ada", (17, 18), "eos", 0.012, 95.5, 0.2, 0.001),
    MemoryUpdateStarted("c1", 1, 0),
    MemoryUpdated("c1", 1, 1, 0.004),
    MemoryUpdated("c1", 2, 2, 0.004, (0.25, 0.125), (0.5, 0.75)),
    InteractionFailed("c1", 2, "QueryTooLongError", "too long", "query", 1),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_msgpack_round_trip(event: Event) -> None:
    wire = events.pack(event)
    assert isinstance(msgpack.unpackb(wire), dict)
    again = events.unpack(wire)
    assert again == event and type(again) is type(event)
    assert events.from_dict(event.to_dict()) == event


def test_events_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLES[0].turn = 5  # type: ignore[misc]


def test_bad_wire_data_is_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="unknown event type 'nope'"):
        events.from_dict({"type": "nope"})
    with pytest.raises(ValueError, match="do not match event 'token'"):
        events.from_dict({"type": "token", "conversation_id": "c", "turn": 1})
    with pytest.raises(ValueError, match="msgpack map"):
        events.unpack(msgpack.packb([1, 2]))


def test_an_older_memory_updated_without_layer_figures_still_decodes() -> None:
    old = {"type": "memory_updated", "conversation_id": "c", "turn": 1, "stm_version": 1, "duration_s": 0.1}
    event = events.unpack(msgpack.packb(old))
    assert isinstance(event, MemoryUpdated) and event.layer_change == () and event.layer_gate == ()
