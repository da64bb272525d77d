"""Events are frozen, typed and survive the msgpack wire form unchanged."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

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


# ---------------------------------------------------------------------- delivery
def test_deferred_posts_wait_for_start_drains_then_arrive_in_order() -> None:
    with ThreadPoolExecutor(4) as pool:
        boxes = [events.Mailbox(pool) for _ in range(3)]
        seen: dict[int, list[str]] = {i: [] for i in range(3)}
        drains: list[events.Mailbox] = []
        for step in range(2):  # two steps' tokens before anyone starts the drains
            for i, box in enumerate(boxes):
                box.post(lambda i=i, s=step: seen[i].append(f"token{s}"), drains)  # type: ignore[misc]
        boxes[1].post(lambda: seen[1].append("answer"))  # an ordinary post after them
        assert drains == boxes  # one entry per mailbox that needs a drain
        assert not any(box.wait_idle(0) for box in boxes) and seen == {0: [], 1: [], 2: []}
        events.start_drains(drains)
        assert all(box.wait_idle(10) for box in boxes)
        assert seen == {0: ["token0", "token1"], 1: ["token0", "token1", "answer"], 2: ["token0", "token1"]}


def test_a_slow_subscriber_delays_only_its_own_mailbox_after_start_drains() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        slow, fast = events.Mailbox(pool), events.Mailbox(pool)
        got: list[str] = []
        drains: list[events.Mailbox] = []

        def block() -> None:
            release.wait(10)

        slow.post(block, drains)  # the first mailbox: drained by the fan-out task itself
        fast.post(lambda: got.append("fast"), drains)
        events.start_drains(drains)
        assert fast.wait_idle(10) and got == ["fast"] and not slow.wait_idle(0)
        release.set()
        assert slow.wait_idle(10)


def test_start_drains_delivers_inline_once_the_pool_is_shut_down() -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    boxes = [events.Mailbox(pool) for _ in range(2)]
    got: list[int] = []
    drains: list[events.Mailbox] = []
    for i, box in enumerate(boxes):
        box.post(lambda i=i: got.append(i), drains)  # type: ignore[misc]
    events.start_drains(drains)
    assert sorted(got) == [0, 1] and all(box.wait_idle(0) for box in boxes)  # no order across mailboxes
