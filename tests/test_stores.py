"""STM stores: round trip, monotonic versions, and an engine that persists and resumes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import torch

from rxruntime import ConversationError, Engine
from rxruntime.conversation import ConversationState, config_fingerprint
from rxruntime.models import RxTModel, RxTokenizer
from rxruntime.stores import InMemoryStore, RedisStore, SQLiteStore, StaleStateError, STMStore, open_store

from .conftest import tiny_config

CORPUS = ["Hi, I'm Ada and my cat is called Pixel. What is my name? Your name is Ada."] * 30


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[STMStore]:
    if request.param == "memory":
        s: STMStore = InMemoryStore()
    elif request.param == "sqlite":
        s = SQLiteStore(tmp_path / "stm.db")
    else:
        s = RedisStore(client=fakeredis.FakeRedis())
    yield s
    s.close()


def _state(cid: str, version: int, fill: float = 0.0) -> ConversationState:
    return ConversationState(cid, version, version, torch.full((2, 3, 4), fill), "fp")


def test_round_trip_and_missing(store: STMStore) -> None:
    assert store.get("a") is None
    store.put(_state("a", 1, 0.5))
    got = store.get("a")
    assert got is not None and got.stm_version == 1 and torch.equal(got.stm, torch.full((2, 3, 4), 0.5))
    store.put(_state("a", 2, 0.7))
    got = store.get("a")
    assert got is not None and got.stm_version == 2
    store.delete("a")
    assert store.get("a") is None


def test_writes_are_monotonic(store: STMStore) -> None:
    store.put(_state("a", 3))
    with pytest.raises(StaleStateError, match="v3"):
        store.put(_state("a", 3))
    with pytest.raises(StaleStateError):
        store.put(_state("a", 2))
    got = store.get("a")
    assert got is not None and got.stm_version == 3  # the stored memory was not overwritten


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_store("memory://"), InMemoryStore)
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///rel.db")
    assert isinstance(relative, SQLiteStore) and relative.path == "rel.db"
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db")
    assert isinstance(absolute, SQLiteStore) and absolute.path == f"{tmp_path}/abs.db"
    with pytest.raises(ConversationError, match="unknown store URL"):
        open_store("ftp://x")


@pytest.fixture(scope="module")
def tok() -> RxTokenizer:
    return RxTokenizer.train(CORPUS, vocab_size=300)


def test_engine_persists_every_commit_and_resumes(tok: RxTokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RxTModel(tiny_config(vocab_size=300)).eval()
    store = SQLiteStore(tmp_path / "stm.db")
    with Engine(model, tok, store=store) as eng:
        conv = eng.conversation("ada")
        conv.ask("Hi, I'm Ada.", max_new_tokens=4)
        conv.ask("What is my name?", max_new_tokens=4)
        assert conv.wait_for_memory(10)
        live = conv.export_state()
    stored = store.get("ada")
    assert stored is not None and stored.stm_version == 2 and stored.turn == 2
    assert torch.equal(stored.stm, live.stm)
    assert stored.config_fingerprint == config_fingerprint(model.config)
    with Engine(model, tok, store=SQLiteStore(tmp_path / "stm.db")) as eng:  # a restarted worker
        resumed = eng.conversation("ada")
        assert resumed.stm_version == 2 and torch.equal(resumed.export_state().stm, live.stm)
        resumed.ask("And again?", max_new_tokens=2)
        assert resumed.wait_for_memory(10) and resumed.stm_version == 3
        resumed.reset()
        after_reset = store.get("ada")
        assert after_reset is not None and after_reset.stm_version == 4


def test_a_stale_worker_cannot_overwrite_newer_memory(tok: RxTokenizer) -> None:
    torch.manual_seed(0)
    model = RxTModel(tiny_config(vocab_size=300)).eval()
    store = InMemoryStore()
    with Engine(model, tok, store=store) as a, Engine(model, tok, store=store) as b:
        conv_a, conv_b = a.conversation("x"), b.conversation("x")  # both start from v0
        conv_a.ask("Hi", max_new_tokens=2)
        assert conv_a.wait_for_memory(10) and conv_a.stm_version == 1
        events: list[object] = []
        error: list[Exception] = []
        import threading

        done = threading.Event()

        def on_error(e: Exception) -> None:
            error.append(e)
            done.set()

        conv_b.interact("Hello", max_new_tokens=2).subscribe(events.append, on_error, done.set)
        assert done.wait(10)
        assert isinstance(error[0], StaleStateError)
        stored = store.get("x")
        assert stored is not None and stored.stm_version == 1  # the newer memory was not overwritten
        # b re-read the store instead of staying wedged: it now holds a's memory and goes on
        assert conv_b.stm_version == 1 and torch.equal(conv_b.export_state().stm, conv_a.export_state().stm)
        conv_b.ask("Hello again", max_new_tokens=2)
        assert conv_b.wait_for_memory(10) and conv_b.stm_version == 2 and conv_b.memory_error is None
        stored = store.get("x")
        assert stored is not None and stored.stm_version == 2
