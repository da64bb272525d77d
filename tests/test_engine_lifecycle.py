"""Lifecycle: close/open/restore/export during memory updates, snapshots the store cannot hold,
eviction of idle conversations, seeing a failed memory update, and exiting without close()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from rxruntime import AnswerCompleted, ConversationError, Engine, ModelExecutionError
from rxruntime.conversation import ConversationState, config_fingerprint
from rxruntime.events import Event
from rxruntime.models import RxTModel, RxTokenizer
from rxruntime.stores import SQLiteStore

from .conftest import tiny_config


def make_model(memory_delay: float = 0.0) -> RxTModel:
    torch.manual_seed(0)
    model = RxTModel(tiny_config(vocab_size=300, max_seq_len=48)).eval()
    if memory_delay:
        real = model.memory_update

        def slow(stm: Tensor, ids: Tensor, mask: Tensor | None = None, gates: Any = None) -> Tensor:
            time.sleep(memory_delay)
            return real(stm, ids, mask, gates)

        setattr(model, "memory_update", slow)  # noqa: B010
    return model


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "stm.db")
    yield s
    s.close()


def answer_then(conv: Any, query: str, then: Any) -> None:
    """Run ``then()`` on the delivery thread right at AnswerCompleted (its memory update is pending)."""
    done = threading.Event()

    def on_next(event: Event) -> None:
        if isinstance(event, AnswerCompleted):
            then()
            done.set()

    conv.interact(query, max_new_tokens=3).subscribe(on_next, lambda e: done.set())
    assert done.wait(20)


def test_close_then_open_right_after_the_answer_keeps_conversations_healthy(
    tok: RxTokenizer, store: SQLiteStore
) -> None:
    """It once wedged 30 of 30 conversations: every later turn raised StaleStateError."""
    with Engine(make_model(memory_delay=0.05), tok, store=store) as eng:
        names = [f"c{i}" for i in range(30)]
        reopened: dict[str, Any] = {}
        for name in names:
            conv = eng.conversation(name)
            answer_then(
                conv, "Hi", lambda conv=conv, name=name: (conv.close(), reopened.update({name: eng.conversation(name)}))
            )
        for name in names:
            conv = reopened[name]
            assert conv.ask("Hi again", max_new_tokens=3, wait_for_memory=True, timeout=20) is not None
            assert conv.stm_version == 2 and conv.memory_error is None
            stored = store.get(name)
            assert stored is not None and stored.stm_version == 2 and stored.turn == 2


def test_export_and_restore_during_a_memory_update(tok: RxTokenizer, store: SQLiteStore) -> None:
    with Engine(make_model(memory_delay=0.2), tok, store=store) as eng:
        conv = eng.conversation("x")
        snapshots: list[ConversationState] = []
        answer_then(conv, "Hi", lambda: snapshots.append(conv.export_state(wait=False)))
        assert snapshots[0].stm_version == 0  # the last committed memory, not a half-written one
        conv.load_state(snapshots[0])  # ordered after the running update; blocks until committed
        assert conv.stm_version == 2 and torch.equal(conv.export_state().stm, snapshots[0].stm)
        stored = store.get("x")
        assert stored is not None and stored.stm_version == 2 and torch.equal(stored.stm, snapshots[0].stm)
        assert conv.ask("Hi", max_new_tokens=3, wait_for_memory=True) is not None and conv.stm_version == 3


def _state(config: Any, **changes: Any) -> ConversationState:
    fields: dict[str, Any] = dict(
        conversation_id="r",
        turn=3,
        stm_version=5,
        stm=torch.zeros(config.num_layers, config.stm_size, config.dim),
        config_fingerprint=config_fingerprint(config),
    )
    fields.update(changes)
    return ConversationState(**fields)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stm": "nan"}, "NaN or infinite"),
        ({"stm": "inf"}, "NaN or infinite"),
        ({"stm_version": 2**60}, "stm_version"),
        ({"stm_version": -1}, "stm_version"),
        ({"turn": 2**63}, "turn"),
        ({"stm": "int"}, "floating"),
    ],
)
def test_restore_refuses_what_the_model_or_the_store_cannot_hold(
    tok: RxTokenizer, store: SQLiteStore, changes: dict[str, Any], message: str
) -> None:
    with Engine(make_model(), tok, store=store) as eng:
        shape = (eng.config.num_layers, eng.config.stm_size, eng.config.dim)
        kind = changes.get("stm")
        if kind == "nan":
            changes["stm"] = torch.full(shape, float("nan"))
        elif kind == "inf":
            changes["stm"] = torch.full(shape, float("inf"))
        elif kind == "int":
            changes["stm"] = torch.zeros(shape, dtype=torch.int64)
        bad = _state(eng.config, **changes)
        conv = eng.conversation("r")
        with pytest.raises(ConversationError, match=message):
            conv.load_state(bad)
        with pytest.raises(ConversationError, match=message):
            eng.conversation("other", state=bad)
        assert conv.stm_version == 0 and store.get("r") is None and store.get("other") is None
        with pytest.raises(ConversationError):
            ConversationState.from_bytes(bad.to_bytes()).check_fits(eng.config)


def test_restore_persists_what_it_accepts(tok: RxTokenizer, store: SQLiteStore) -> None:
    with Engine(make_model(), tok, store=store) as eng:
        good = _state(eng.config, conversation_id="new", stm=torch.full((2, 6, 32), 0.25))
        conv = eng.conversation(state=good)
        stored = store.get("new")
        assert stored is not None and stored.stm_version == 5 and torch.equal(stored.stm, good.stm)
        conv.close()
        again = eng.conversation(state=good)  # the store already holds v5: moved past it
        assert again.stm_version == 6
        stored = store.get("new")
        assert stored is not None and stored.stm_version == 6


def test_idle_conversations_are_evicted_and_resume_from_the_store(tok: RxTokenizer, store: SQLiteStore) -> None:
    with Engine(make_model(), tok, store=store, max_resident=3) as eng:
        convs = [eng.conversation(f"e{i}") for i in range(8)]
        for conv in convs:
            conv.ask("Hi", max_new_tokens=3, wait_for_memory=True)
        before = {c.id: (c.stm_version, store.get(c.id)) for c in convs}
        assert eng.stats()["resident_conversations"] <= 3 and eng.open_conversations == 8
        for conv in convs:  # every one resumes transparently, its memory intact
            state = conv.export_state()
            stored = before[conv.id][1]
            assert stored is not None and state.stm_version == 1 and torch.equal(state.stm, stored.stm)
        for conv in convs:
            conv.ask("Again", max_new_tokens=3, wait_for_memory=True)
            assert conv.stm_version == 2
        assert eng.stats()["resident_conversations"] <= 3


def test_ask_can_wait_for_the_memory_update_and_raise_its_failure(tok: RxTokenizer) -> None:
    model = make_model()
    real = model.memory_update
    broken = {"on": True}

    def memory_update(stm: Tensor, ids: Tensor, mask: Tensor | None = None, gates: Any = None) -> Tensor:
        if broken["on"]:
            raise RuntimeError("injected memory failure")
        return real(stm, ids, mask, gates)

    setattr(model, "memory_update", memory_update)  # noqa: B010
    with Engine(model, tok) as eng:
        conv = eng.conversation("m")
        assert conv.ask("Hi", max_new_tokens=2) is not None  # returns at the answer, as documented
        assert conv.wait_for_memory(10)
        assert isinstance(conv.memory_error, ModelExecutionError)  # ... and the failure is visible
        with pytest.raises(ModelExecutionError, match="injected memory failure"):
            conv.ask("Hi", max_new_tokens=2, wait_for_memory=True)
        broken["on"] = False
        assert conv.ask("Hi", max_new_tokens=2, wait_for_memory=True) is not None
        assert conv.memory_error is None and conv.stm_version == 1


@pytest.mark.parametrize("drop", [False, True])
def test_a_program_that_never_closes_its_engine_exits_cleanly(tmp_path: Path, drop: bool) -> None:
    """It once aborted at exit ("terminate called without an active exception", status 134).
    ``drop``: the program lets go of the engine before exiting (it is closed when collected)."""
    script = textwrap.dedent(
        """
        import gc, sys
        import rxruntime
        from rxruntime.stores import SQLiteStore

        engine = rxruntime.load("small", store=SQLiteStore(sys.argv[1]))
        conv = engine.conversation("x")
        print(conv.ask("I live in Lisbon.", max_new_tokens=8), flush=True)
        if sys.argv[2] == "drop":
            del engine, conv
            gc.collect()
        """
    )
    db = tmp_path / "stm.db"
    command = [sys.executable, "-c", script, str(db), "drop" if drop else "keep"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "terminate called" not in result.stderr
    stored = SQLiteStore(db).get("x")
    assert stored is not None and stored.stm_version == 1  # the update owed at exit was committed


def test_ask_returns_the_answer_when_the_memory_failure_follows_at_once() -> None:
    """The failure may arrive before ``ask``'s thread wakes up for the answer: it still returns it."""

    import reactivex

    from rxruntime.conversation import TurnMethods
    from rxruntime.events import AnswerCompleted

    class Instant(TurnMethods):
        def interact(self, query: Any, **options: Any) -> reactivex.Observable[Any]:
            def subscribe(observer: Any, scheduler: Any = None) -> Any:
                observer.on_next(AnswerCompleted("c", 1, "hello", (7,), "eos", 0.0, 0.0, 0.0, 0.0))
                observer.on_error(ModelExecutionError("memory update failed"))
                return reactivex.disposable.Disposable()

            return reactivex.create(subscribe)

    assert Instant().ask("Hi") == "hello"
    with pytest.raises(ModelExecutionError):
        Instant().ask("Hi", wait_for_memory=True)
