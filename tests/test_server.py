"""``rxrt serve`` over a real zmq socket: the client API, bad input, cancellation, persistence."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq

from rxruntime import ConversationError, Engine, QueryTooLongError
from rxruntime.events import AnswerCompleted, Event, MemoryUpdated, Token
from rxruntime.serving.client import Client, RemoteConversation
from rxruntime.serving.zmq.errors import ProtocolError
from rxruntime.serving.zmq.server import Server
from rxruntime.stores import SQLiteStore

from .serving_util import engine as make_engine
from .serving_util import write_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def served(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Client, Engine, Server]]:
    engine = make_engine(model_dir, SQLiteStore(tmp_path / "stm.db"))
    server = Server(engine, "tcp://127.0.0.1:*").start()
    client = Client(server.endpoint, timeout=20)
    yield client, engine, server
    client.close()
    server.stop()
    engine.close()


def test_remote_conversation_matches_a_local_one(served: tuple[Client, Engine, Server], model_dir: Path) -> None:
    client, _, _ = served
    assert client.ping()["protocol"] == "rxrt/2"
    remote = client.open("ada")
    answers = [remote.ask("Hi, I'm Ada.", max_new_tokens=6), remote.ask("What is my name?", max_new_tokens=6)]
    with make_engine(model_dir) as local_engine:
        local = local_engine.conversation("ada")
        expected = [local.ask("Hi, I'm Ada.", max_new_tokens=6), local.ask("What is my name?", max_new_tokens=6)]
    assert answers == expected


def test_remote_events_stream_in_order(served: tuple[Client, Engine, Server]) -> None:
    client, _, _ = served
    conv = client.open()
    events: list[Event] = []
    done = threading.Event()
    conv.interact("Hi", max_new_tokens=5).subscribe(events.append, on_completed=done.set)
    assert done.wait(20)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "QueryReceived" and kinds[-3:] == ["AnswerCompleted", "MemoryUpdateStarted", "MemoryUpdated"]
    answer = next(e for e in events if isinstance(e, AnswerCompleted))
    assert "".join(e.text for e in events if isinstance(e, Token)) == answer.text

    async def stream() -> list[Event]:
        return [e async for e in conv.astream("Again", max_new_tokens=3)]

    streamed = asyncio.run(stream())
    assert isinstance(streamed[-1], MemoryUpdated) and streamed[-1].stm_version == 2


def test_typed_errors_cross_the_wire(served: tuple[Client, Engine, Server]) -> None:
    client, _, _ = served
    conv = client.open()
    with pytest.raises(QueryTooLongError):
        conv.ask("Ada " * 100)
    with pytest.raises(ConversationError, match="unknown conversation"):
        client.call("interact", conversation_id="nope", query="hi")
    with pytest.raises(ProtocolError, match="unknown op"):
        client.call("dance")
    with pytest.raises(ProtocolError, match="'options'"):
        client.call("interact", conversation_id=conv.id, query="hi", options={"temprature": 1})
    with pytest.raises(ProtocolError, match="'query'"):
        client.call("interact", conversation_id=conv.id, query={"x": 1})
    assert conv.ask("still fine?", max_new_tokens=2) is not None


def test_malformed_and_oversized_frames_get_an_error_and_serve_on(served: tuple[Client, Engine, Server]) -> None:
    client, _, server = served
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(server.endpoint)
    try:
        for payload, expected in [
            (b"\xc1garbage", "not a msgpack message"),
            (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
            (msgpack.packb({"op": "interact", "rid": 7}), "missing field 'conversation_id'"),
            (b"x" * (server.max_message_bytes + 1), "exceeds the limit"),
        ]:
            raw.send(payload)
            assert raw.poll(10_000), "no reply"
            reply = msgpack.unpackb(raw.recv(), raw=False)
            assert reply["error"]["type"] == "ProtocolError" and expected in reply["error"]["message"]
    finally:
        raw.close(0)
        ctx.term()
    assert client.open().ask("Hi", max_new_tokens=2) is not None  # the server kept serving


def test_disposing_a_remote_turn_cancels_it_on_the_server(served: tuple[Client, Engine, Server]) -> None:
    client, engine, _ = served
    real_step = engine.model.decode_step

    def slow_endless(*args: Any) -> torch.Tensor:
        time.sleep(0.02)
        out: torch.Tensor = real_step(*args)
        out[:, engine.config.special_tokens.eos_id] = -1e9
        return out

    setattr(engine.model, "decode_step", slow_endless)  # noqa: B010 - the engine is thrown away
    conv = client.open("c")
    first = threading.Event()

    def on_next(event: Event) -> None:
        if isinstance(event, Token):
            first.set()

    sub = conv.interact("Hi").subscribe(on_next)
    assert first.wait(20)
    sub.dispose()
    deadline = time.monotonic() + 10
    while engine.stats()["active_turns"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats()["active_turns"] == 0
    assert engine.history("c")[-1]["finish_reason"] == "cancelled"


def test_memory_persists_across_a_server_restart(model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "stm.db"
    with make_engine(model_dir, SQLiteStore(db)) as engine:
        server = Server(engine, "tcp://127.0.0.1:*").start()
        with Client(server.endpoint, timeout=20) as client:
            conv = client.open("ada")
            conv.ask("Hi, I'm Ada.", max_new_tokens=4)
            before = conv.export_state()  # waits for the memory update
        server.stop()
    assert before.stm_version == 1
    with make_engine(model_dir, SQLiteStore(db)) as engine:  # a new worker, nothing in memory
        server = Server(engine, "tcp://127.0.0.1:*").start()
        with Client(server.endpoint, timeout=20) as client:
            # no open: the worker resumes the stored conversation on demand
            resumed = RemoteConversation(client, "ada")
            after = resumed.export_state()
            assert after.stm_version == 1 and torch.equal(after.stm, before.stm)
            resumed.ask("What is my name?", max_new_tokens=3)
            assert resumed.export_state().stm_version == 2
            restored = client.restore(before)
            assert restored.id == "ada"
        server.stop()


def test_rxrt_serve_command(model_dir: Path, tmp_path: Path) -> None:
    port_socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REP)
    port = port_socket.bind_to_random_port("tcp://127.0.0.1")
    port_socket.close(0)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rxruntime.cli",
            "serve",
            "--model",
            str(model_dir),
            "--bind",
            f"tcp://127.0.0.1:{port}",
            "--store",
            f"sqlite:///{tmp_path}/s.db",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            assert client.ping()["protocol"] == "rxrt/2"
            assert isinstance(client.open("x").ask("Hi", max_new_tokens=2), str)
    finally:
        proc.send_signal(2)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "rxrt serve" in out and "stopping" in out
    assert SQLiteStore(tmp_path / "s.db").get("x") is not None
