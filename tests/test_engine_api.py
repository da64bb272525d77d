"""The engine's surface for fronts: a given STM, memory-only turns (history replay), admission
bounds, deleting conversations and the counters for monitoring."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from rxruntime import (
    ConversationError,
    Engine,
    InvalidOptionError,
    MemoryUpdated,
    MemoryUpdateStarted,
    QueryTooLongError,
    QueueFullError,
)
from rxruntime.events import Event
from rxruntime.models import RxTokenizer
from rxruntime.stores import SQLiteStore

from .engine_util import collect, make_model, patch


def _shape(engine: Engine) -> tuple[int, int, int]:
    c = engine.config
    return (c.num_layers, c.stm_size, c.dim)


# ---------------------------------------------------------------------- a given STM
def test_conversation_from_a_given_stm(engine: Engine) -> None:
    stm = torch.randn(_shape(engine), dtype=torch.float64)
    conv = engine.conversation("given", stm=stm)
    state = conv.export_state()
    assert state.stm_version == 0 and torch.allclose(state.stm, stm.float())
    stm.zero_()  # the engine holds its own copy
    assert not torch.equal(conv.export_state().stm, torch.zeros_like(state.stm))
    assert conv.ask("Hi", max_new_tokens=3) is not None


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda s: torch.zeros(s[1], s[2]), "shape"),
        (lambda s: torch.zeros(1, *s), "shape"),
        (lambda s: torch.zeros(s, dtype=torch.long), "floating"),
        (lambda s: torch.full(s, float("nan")), "NaN"),
        (lambda s: torch.full(s, float("inf")), "infinite"),
        (lambda s: [[0.0]], "torch.Tensor"),
    ],
)
def test_a_bad_stm_is_refused_clearly(engine: Engine, bad: Any, message: str) -> None:
    with pytest.raises(ConversationError, match=message):
        engine.conversation("bad", stm=bad(_shape(engine)))
    assert engine.open_conversations == 0  # nothing was opened


def test_state_excludes_stm_and_memory_init(engine: Engine) -> None:
    state = engine.conversation("src").export_state()
    for other in ({"stm": torch.zeros(_shape(engine))}, {"memory_init": "system"}):
        with pytest.raises(ConversationError, match="at most one"):
            engine.conversation("x", state=state, **other)


def test_memory_init_is_read_into_a_given_stm(engine: Engine) -> None:
    """stm + memory_init: the system text's memory update starts from the given STM."""
    stm = torch.randn(_shape(engine), generator=torch.Generator().manual_seed(3))
    conv = engine.conversation("given", stm=stm, memory_init="You are talking to Ada.")
    assert conv.wait_for_memory(60)
    ids = torch.tensor([engine.tokenizer.system_ids("You are talking to Ada.")])
    with torch.no_grad():
        expected = engine.model.memory_update(stm[None], ids)[0]
    assert torch.allclose(conv.export_state().stm, expected, atol=1e-5)


# ---------------------------------------------------------------------- memory-only turns
def test_memorize_is_the_memory_update_over_the_interaction(tok: RxTokenizer) -> None:
    """memorize(q, a) writes what the encoder + memory attention make of [BOS][Q] q [A] a [EOS]."""
    model = make_model()
    with Engine(model, tok) as eng:
        conv = eng.conversation("m")
        before = conv.export_state().stm
        assert conv.memorize("Hi, I'm Ada.", "Your name is Ada.") == 1 and conv.stm_version == 1
        ids = torch.tensor([tok.interaction_ids("Hi, I'm Ada.", "Your name is Ada.")])
        with torch.inference_mode():
            expected = model.memory_update(before[None], ids, torch.ones_like(ids, dtype=torch.bool))[0]
        assert torch.allclose(conv.export_state().stm, expected, atol=1e-6)
        assert not torch.allclose(before, expected, atol=1e-4)


def test_replay_runs_in_order_with_turns_and_emits_memory_events(engine: Engine) -> None:
    conv = engine.conversation("r")
    seen: list[Event] = []
    conv.memory_events.subscribe(seen.append)
    first, _ = collect(conv.interact("Hi", max_new_tokens=3))
    version = conv.replay([("What is my name?", "Your name is Ada."), ("Paris?", "Paris is sunny.")])
    assert version == 3 and conv.stm_version == 3
    later, error = collect(conv.interact("And now?", max_new_tokens=2))
    assert error is None
    assert {e.turn for e in first} == {1} and {e.turn for e in later} == {4}
    assert conv.wait_for_memory(10)
    kinds = [(type(e).__name__, e.turn, getattr(e, "stm_version", None)) for e in seen]
    assert kinds == [
        ("MemoryUpdateStarted", 1, 0),
        ("MemoryUpdated", 1, 1),
        ("MemoryUpdateStarted", 2, 1),
        ("MemoryUpdated", 2, 2),
        ("MemoryUpdateStarted", 3, 2),
        ("MemoryUpdated", 3, 3),
        ("MemoryUpdateStarted", 4, 3),
        ("MemoryUpdated", 4, 4),
    ]
    assert all(isinstance(e, (MemoryUpdateStarted, MemoryUpdated)) for e in seen)


def test_memorize_waits_behind_a_running_turn(engine: Engine) -> None:
    conv = engine.conversation("w")
    done = threading.Event()
    conv.interact("Hi", max_new_tokens=8).subscribe(on_completed=done.set)
    assert conv.memorize("q", "a") == 2  # turn 1 committed v1 first, then this one v2
    assert done.wait(10)


def test_memorize_checks_everything_before_queueing(engine: Engine) -> None:
    conv = engine.conversation("v")
    with pytest.raises(InvalidOptionError, match=r"interactions\[1\]") as info:
        conv.replay([("a", "b"), ("only one",)])  # type: ignore[list-item]
    assert info.value.field == "interactions[1]"
    with pytest.raises(QueryTooLongError, match=r"interactions\[0\]"):
        conv.memorize("word " * 200, "x")
    with pytest.raises(InvalidOptionError, match="interactions"):
        engine.memorize("v", "not pairs")  # type: ignore[arg-type]
    assert conv.stm_version == 0 and conv.replay([]) == 0
    assert collect(conv.interact("Hi", max_new_tokens=2))[0][0].turn == 1  # no turn number was used


def test_memorize_reports_a_failed_update_and_skips_the_rest(engine: Engine) -> None:
    conv = engine.conversation("f")
    real = engine.model.memory_update
    calls = {"n": 0}

    def failing(*args: Any) -> Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real(*args)

    patch(engine.model, "memory_update", failing)
    with pytest.raises(Exception, match="injected"):
        conv.replay([("a", "b"), ("c", "d"), ("e", "f")])
    assert conv.wait_for_memory(10)
    assert conv.stm_version in (1, 2)  # the first pair committed; the failed one did not
    assert conv.stm_version == 1 or calls["n"] == 3


# ---------------------------------------------------------------------- bounds
def test_turns_per_conversation_are_bounded(tok: RxTokenizer) -> None:
    model = make_model()
    real = model.decode_step

    def slow_step(*args: Any) -> Tensor:
        time.sleep(0.02)
        return real(*args)

    patch(model, "decode_step", slow_step)
    with Engine(model, tok, max_turns_per_conversation=2) as eng:
        conv = eng.conversation("b")
        outcomes = []
        for _ in range(4):  # pipelined: all sent before the first answers
            events: list[Event] = []
            errors: list[BaseException] = []
            done = threading.Event()

            def on_error(e: Exception, errors: list[BaseException] = errors, done: threading.Event = done) -> None:
                errors.append(e)
                done.set()

            conv.interact("Hi", max_new_tokens=6).subscribe(events.append, on_error, done.set)
            outcomes.append((events, errors, done))
        assert all(done.wait(20) for _, _, done in outcomes)
        refused = [errors[0] for _, errors, _ in outcomes if errors]
        assert refused and all(isinstance(e, QueueFullError) for e in refused)
        served = sorted({e.turn for events, errors, _ in outcomes if not errors for e in events})
        assert len(served) == 4 - len(refused) >= 2
        assert served == list(range(1, len(served) + 1))  # refused queries used no turn number


def test_memory_init_bursts_are_bounded(tok: RxTokenizer) -> None:
    model = make_model()
    real = model.memory_update
    gate = threading.Event()

    def blocked(*args: Any) -> Tensor:
        gate.wait(20)
        return real(*args)

    patch(model, "memory_update", blocked)
    with Engine(model, tok, max_memory_backlog=2) as eng:
        opened = 0
        refused: list[QueueFullError] = []
        for i in range(10):
            try:
                eng.conversation(f"m{i}", memory_init="You are helpful.")
                opened += 1
            except QueueFullError as exc:
                refused.append(exc)
        assert 2 <= opened < 10 and len(refused) == 10 - opened
        assert "max_memory_backlog" in str(refused[0]) and eng.open_conversations == opened
        gate.set()
        deadline = time.monotonic() + 10
        while eng.stats()["memory_backlog"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.stats()["memory_backlog"] == 0
        eng.conversation("later", memory_init="ok").wait_for_memory(10)  # room again


def test_engine_wide_queue_is_bounded(tok: RxTokenizer) -> None:
    with Engine(make_model(), tok, max_queued_turns=1) as eng:
        conv = eng.conversation("q")
        with pytest.raises(QueueFullError, match="max_queued_turns"):
            conv.replay([("a", "b"), ("c", "d")])
        assert eng.queue_depth == 0 and conv.stm_version == 0


# ---------------------------------------------------------------------- delete and counters
def test_delete_removes_the_conversation_and_its_stored_memory(tok: RxTokenizer, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "stm.db")
    with Engine(make_model(), tok, store=store) as eng:
        conv = eng.conversation("gone")
        conv.interact("Hi", max_new_tokens=4).subscribe()
        time.sleep(0.05)
        conv.delete()  # possibly while its memory update runs: nothing is written back after
        assert store.get("gone") is None and eng.open_conversations == 0
        time.sleep(0.2)
        assert store.get("gone") is None
        with pytest.raises(ConversationError, match="unknown"):
            eng.delete_conversation("gone")
        other = eng.conversation("stored")
        other.ask("Hi", max_new_tokens=2)
        assert other.wait_for_memory(10)
        other.close()
        assert store.get("stored") is not None
        eng.delete_conversation("stored")  # stored but not open: deleted from the store
        assert store.get("stored") is None


def test_counters_for_monitoring(engine: Engine) -> None:
    assert engine.queue_depth == 0 and engine.open_conversations == 0
    a = engine.conversation("a")
    engine.conversation("b")
    assert engine.open_conversations == 2
    stats = engine.stats()
    assert stats["open_conversations"] == 2 and stats["queue_depth"] == 0 and stats["active_turns"] == 0
    assert set(stats) >= {"memory_backlog", "max_batch", "max_queued_turns"}
    a.close()
    assert engine.open_conversations == 1


def test_a_models_answer_cap_applies_when_a_turn_sets_none(tok: RxTokenizer) -> None:
    """``config.answer_tokens`` (the default model ships 64) caps an answer whose turn gives no
    ``max_new_tokens``; a turn's own cap wins, above it or below it."""
    import dataclasses

    from rxruntime.events import Token

    model = make_model()
    model.config = dataclasses.replace(model.config, answer_tokens=4)
    with torch.no_grad():  # [EOS] never wins: every answer runs to its cap
        head = model.decoder.lm_head.weight
        head[model.config.special_tokens.eos_id] = 0.5 * head[100]
    with Engine(model, tok) as eng:
        conv = eng.conversation(seed=0)

        def tokens(**options: Any) -> int:
            events, error = collect(conv.interact("Hi", **options))
            assert error is None
            return sum(isinstance(e, Token) for e in events)

        assert tokens() == 4
        assert tokens(max_new_tokens=9) == 9
        assert tokens(max_new_tokens=2) == 2
