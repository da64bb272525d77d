"""Batched memory updates: the memory worker runs the updates queued together as one batch.

Each test holds the worker inside a first, lone update (a gate in ``memory_update``) while the
others queue, then lets it go, so which updates share a batch is decided, not timed. Each
conversation's new STM must be what its update alone gives; its memory events keep their order;
a failing update fails only its own conversation; a batch never exceeds ``max_memory_batch``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from rxruntime import Engine, InvalidOptionError, ModelExecutionError
from rxruntime.events import Event, MemoryUpdated, MemoryUpdateStarted
from rxruntime.models import RxTModel, RxTokenizer

from .engine_util import CORPUS, make_model

PAIRS = [
    ("Hi, I'm Ada.", "Your name is Ada."),
    ("What is my name?", "Ada."),
    ("Paris is sunny.", "Hi, I'm Ada and my cat is called Pixel. What is my name?"),
    ("Hi", "Paris"),
    ("my cat is called Pixel.", "What is my cat called? Pixel is sunny."),
]


@pytest.fixture(scope="module")
def tok() -> RxTokenizer:
    return RxTokenizer.train(CORPUS, vocab_size=300)


class Gated:
    """``memory_update`` of ``model`` that records each batch's size and holds the first call until
    ``open()``; with ``poison``, a batch holding that row raises (a failure of one conversation)."""

    def __init__(self, model: RxTModel, poison: list[int] | None = None) -> None:
        self.real = model.memory_update
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.poison = poison

        def memory_update(stm: Tensor, ids: Tensor, mask: Tensor | None = None, gates: Any = None) -> Tensor:
            self.sizes.append(int(ids.shape[0]))
            self.gate.wait(60)
            if self.poison is not None and any(row[: len(self.poison)].tolist() == self.poison for row in ids):
                raise RuntimeError("injected memory failure")
            return self.real(stm, ids, mask, gates)

        setattr(model, "memory_update", memory_update)  # noqa: B010 - the model is thrown away afterwards

    def alone(self, stm: Tensor, ids: list[int]) -> Tensor:
        """What one conversation's update gives with nothing else in its batch."""
        x = torch.tensor([ids])
        with torch.inference_mode():
            return self.real(stm[None], x, torch.ones_like(x, dtype=torch.bool))[0]


def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for the engine's threads to reach a state (a deadline against hangs, not a timing)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


Run = tuple[threading.Thread, list[Any]]


def in_background(fn: Callable[..., Any], *args: Any) -> Run:
    """``fn(*args)`` on a thread; its result (or what it raised) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.fixture
def held(tok: RxTokenizer) -> Iterator[tuple[Engine, Gated]]:
    """An engine whose memory worker is held inside a lone first update (conversation 'blocker')."""
    model = make_model()
    gated = Gated(model)
    with Engine(model, tok, max_memory_batch=3) as eng:
        thread, _ = in_background(lambda: eng.conversation("blocker").memorize("Hi", "Hi"))
        until(lambda: gated.sizes == [1], "the lone first update started")
        yield eng, gated
        gated.gate.set()
        thread.join(30)


def queue_updates(eng: Engine, names: list[str], pairs: list[tuple[str, str]]) -> list[Run]:
    """Each conversation memorizes its pair in the background; returns once every update is
    queued at the (held) memory worker."""
    convs = [eng.conversation(n) for n in names]
    runs = [in_background(c.memorize, *p) for c, p in zip(convs, pairs)]
    until(lambda: eng._memory.backlog == len(names), f"{len(names)} updates queued")
    return runs


def initial_stm(eng: Engine, name: str) -> Tensor:
    """The STM a conversation opened as ``name`` starts from (seeded by its id)."""
    probe = eng.conversation(name)
    stm = probe.export_state().stm
    probe.close()
    return stm


def test_updates_queued_together_run_as_one_batch_and_each_stm_is_its_own(
    held: tuple[Engine, Gated], tok: RxTokenizer
) -> None:
    eng, gated = held
    names = ["a", "b", "c"]
    before = {n: initial_stm(eng, n) for n in names}
    runs = queue_updates(eng, names, PAIRS[:3])  # three lengths: the batch is padded
    gated.gate.set()
    for thread, out in runs:
        thread.join(30)
        assert out == [1]
    assert gated.sizes == [1, 3]  # one batch for the three
    for n, (q, a) in zip(names, PAIRS):
        got = _stm(eng, n)
        expected = gated.alone(before[n], tok.interaction_ids(q, a))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, before[n], atol=1e-3)  # the update did change it


def _stm(eng: Engine, name: str) -> Tensor:
    return eng.snapshot(name)[0]


def test_a_batch_is_bounded_by_max_memory_batch(held: tuple[Engine, Gated]) -> None:
    eng, gated = held  # max_memory_batch=3
    names = [f"c{i}" for i in range(5)]
    runs = queue_updates(eng, names, PAIRS)
    gated.gate.set()
    for thread, out in runs:
        thread.join(30)
        assert out == [1]
    assert gated.sizes == [1, 3, 2]  # what was queued, in bounded batches, FIFO


def test_memory_events_keep_their_order_per_conversation_across_batches(held: tuple[Engine, Gated]) -> None:
    eng, gated = held
    names = ["x", "y", "z"]
    seen: dict[str, list[Event]] = {n: [] for n in names}
    convs = [eng.conversation(n) for n in names]
    for c in convs:
        c.memory_events.subscribe(seen[c.id].append)
    runs = [in_background(c.replay, PAIRS[i : i + 2]) for i, c in enumerate(convs)]
    until(lambda: eng._memory.backlog == 3, "the first update of each queued")
    gated.gate.set()
    for thread, out in runs:
        thread.join(30)
        assert out == [2]
    assert gated.sizes[:2] == [1, 3] and sum(gated.sizes[2:]) == 3  # the second turns: any split
    for c in convs:
        c.wait_for_memory(30)
        events = seen[c.id]
        until(lambda: len(events) == 4, "four memory events delivered")  # noqa: B023 - used at once
        kinds = [(type(e).__name__, e.turn) for e in seen[c.id]]
        assert kinds == [
            ("MemoryUpdateStarted", 1),
            ("MemoryUpdated", 1),
            ("MemoryUpdateStarted", 2),
            ("MemoryUpdated", 2),
        ]
        started = [e for e in seen[c.id] if isinstance(e, MemoryUpdateStarted)]
        updated = [e for e in seen[c.id] if isinstance(e, MemoryUpdated)]
        assert [e.stm_version for e in started] == [0, 1] and [e.stm_version for e in updated] == [1, 2]


def test_a_failing_update_in_a_batch_fails_only_its_conversation(tok: RxTokenizer) -> None:
    model = make_model()
    gated = Gated(model, poison=tok.interaction_ids(PAIRS[4][0], PAIRS[4][1])[:6])
    with Engine(model, tok, max_memory_batch=8) as eng:
        blocker, _ = in_background(lambda: eng.conversation("blocker").memorize("Hi", "Hi"))
        until(lambda: gated.sizes == [1], "the lone first update started")
        names = ["ok1", "bad", "ok2"]
        before = {n: initial_stm(eng, n) for n in names}
        pairs = [PAIRS[0], PAIRS[4], PAIRS[2]]
        runs = queue_updates(eng, names, pairs)
        gated.gate.set()
        for thread, _ in runs:
            thread.join(30)
        blocker.join(30)
        outcomes = [out[0] for _, out in runs]
        assert outcomes[0] == 1 and outcomes[2] == 1
        assert isinstance(outcomes[1], ModelExecutionError) and "injected memory failure" in str(outcomes[1])
        assert gated.sizes == [1, 3, 1, 1, 1]  # the batch, then one at a time to find the failing one
        assert eng.stm_version("bad") == 0 and torch.equal(_stm(eng, "bad"), before["bad"])
        for n, (q, a) in zip(names, pairs):
            if n != "bad":
                torch.testing.assert_close(_stm(eng, n), gated.alone(before[n], tok.interaction_ids(q, a)))
                assert eng.stm_version(n) == 1 and eng.memory_error(n) is None


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_max_memory_batch_is_checked(tok: RxTokenizer, bad: object) -> None:
    with pytest.raises(InvalidOptionError, match="max_memory_batch"):
        Engine(make_model(), tok, max_memory_batch=bad)  # type: ignore[arg-type]
