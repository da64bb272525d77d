"""`delete`, `restore` checks, pipelined order, and typed errors across the wire."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rxruntime import ConversationError, Engine
from rxruntime.conversation import ConversationState
from rxruntime.errors import InvalidOptionError
from rxruntime.events import Event, QueryReceived
from rxruntime.serving.client import Client, RemoteConversation
from rxruntime.serving.zmq.errors import ProtocolError
from rxruntime.serving.zmq.wire import error_from_payload, error_payload
from rxruntime.stores import SQLiteStore

from .serving_util import engine, serving, write_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def served(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Client, Engine, SQLiteStore]]:
    store = SQLiteStore(tmp_path / "s.db")
    with engine(model_dir, store) as eng, serving(eng) as server, Client(server.endpoint, timeout=20) as client:
        yield client, eng, store


def test_delete_removes_a_conversation_from_server_and_store(served: tuple[Client, Engine, SQLiteStore]) -> None:
    client, _, store = served
    conv = client.open("gone")
    conv.ask("Hi", max_new_tokens=2)  # the memory update may still be running: delete waits for it
    conv.delete()
    assert store.get("gone") is None
    with pytest.raises(ConversationError, match="unknown conversation"):
        conv.ask("Hi")
    with pytest.raises(ConversationError, match="unknown conversation"):
        client.delete("gone")
    assert client.open("gone").export_state().stm_version == 0  # the id starts afresh


def _snapshot(conv: RemoteConversation) -> ConversationState:
    conv.ask("Hi", max_new_tokens=2)
    return conv.export_state()


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: ConversationState(s.conversation_id, s.turn, s.stm_version, s.stm * math.nan, s.config_fingerprint),
        lambda s: ConversationState(s.conversation_id, s.turn, s.stm_version, s.stm * math.inf, s.config_fingerprint),
        lambda s: ConversationState(s.conversation_id, s.turn, 2**60, s.stm, s.config_fingerprint),
        lambda s: ConversationState(s.conversation_id, 2**60, s.stm_version, s.stm, s.config_fingerprint),
        lambda s: ConversationState("", s.turn, s.stm_version, s.stm, s.config_fingerprint),
    ],
    ids=["nan", "inf", "huge-version", "huge-turn", "empty-id"],
)
def test_restore_refuses_impossible_snapshots(served: tuple[Client, Engine, SQLiteStore], damage: object) -> None:
    client, _, store = served
    conv = client.open("r")
    good = _snapshot(conv)
    bad = damage(good)  # type: ignore[operator]
    with pytest.raises(ProtocolError) as info:
        client.restore(bad)
    assert info.value.field in ("state", "state.conversation_id")
    after = conv.export_state()
    assert after.stm_version == good.stm_version and torch.equal(after.stm, good.stm)
    stored = store.get("r")
    assert stored is not None and stored.stm_version == good.stm_version


def test_restore_persists_what_it_accepts(served: tuple[Client, Engine, SQLiteStore]) -> None:
    client, _, store = served
    good = _snapshot(client.open("src"))
    moved = ConversationState("dst", good.turn, good.stm_version, good.stm, good.config_fingerprint)
    client.restore(moved)
    stored = store.get("dst")
    assert stored is not None and torch.equal(stored.stm, good.stm)


def test_pipelined_turns_run_in_the_order_sent(served: tuple[Client, Engine, SQLiteStore]) -> None:
    client, _, _ = served
    convs = [client.open(f"p{i}") for i in range(4)]
    received: dict[str, list[tuple[int, int]]] = {c.id: [] for c in convs}
    done = threading.Semaphore(0)
    sent = 5
    for t in range(sent):
        for conv in convs:

            def on_next(event: Event, cid: str = conv.id, t: int = t) -> None:
                if isinstance(event, QueryReceived):
                    received[cid].append((t, event.turn))

            conv.interact(f"turn {t}", max_new_tokens=3).subscribe(on_next, on_completed=done.release)
    for _ in range(sent * len(convs)):
        assert done.acquire(timeout=60)
    expected = [(t, t + 1) for t in range(sent)]  # the t-th query sent is turn t + 1, and runs t-th
    assert all(order == expected for order in received.values()), received


def test_engine_errors_keep_their_type_and_field_across_the_wire() -> None:
    exc = error_from_payload(error_payload(InvalidOptionError("top_k", "must be >= 0")))
    assert isinstance(exc, InvalidOptionError) and exc.field == "top_k" and str(exc) == "top_k: must be >= 0"
    exc = error_from_payload(error_payload(ProtocolError("bad", "query")))
    assert isinstance(exc, ProtocolError) and exc.field == "query"
