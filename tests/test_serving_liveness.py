"""Back-pressure and liveness over real zmq: slow and non-reading peers, dead clients, dead servers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq

from rxruntime.conversation import ConversationState
from rxruntime.serving.client import Client
from rxruntime.serving.zmq.errors import ConnectionLost
from rxruntime.stores import InMemoryStore

from .serving_util import engine, free_port, serve_process, serving, wait_until_served, write_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def raw_socket() -> Iterator[Any]:
    ctx = zmq.Context()
    sockets: list[zmq.Socket[bytes]] = []

    def make(endpoint: str, **options: int) -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        sock.connect(endpoint)
        sockets.append(sock)
        return sock

    yield make
    for sock in sockets:
        sock.close(0)
    ctx.term()


def _ping(rid: int) -> bytes:
    return msgpack.packb({"op": "ping", "rid": rid})


def _send_all(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    for frame in frames:
        while True:
            try:
                sock.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:
                time.sleep(0.001)


def test_a_slow_reader_gets_every_reply_in_order(model_dir: Path, raw_socket: Any) -> None:
    """ROUTER used to drop replies at the high-water mark: 1,661 of 3,000 lost without a word."""
    with engine(model_dir) as eng, serving(eng) as server:
        sock = raw_socket(server.endpoint, RCVHWM=10, RCVBUF=4096)
        n = 3000
        sender = threading.Thread(target=_send_all, args=(sock, [_ping(i) for i in range(1, n + 1)]))
        sender.start()
        rids: list[int] = []
        while len(rids) < n:
            assert sock.poll(20_000), f"stalled after {len(rids)} replies"
            reply = msgpack.unpackb(sock.recv(), raw=False)
            assert "ok" in reply, reply
            rids.append(reply["rid"])
            if len(rids) % 100 == 0:
                time.sleep(0.02)  # a slow reader
        sender.join()
        assert rids == list(range(1, n + 1))


def test_a_peer_that_stops_reading_is_bounded_told_and_logged(
    model_dir: Path, raw_socket: Any, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 64 << 10
    caplog.set_level(logging.WARNING, logger="rxruntime.serving")
    with engine(model_dir) as eng, serving(eng, max_pending_bytes=limit) as server:
        sock = raw_socket(server.endpoint, RCVHWM=10, RCVBUF=4096)
        # Ping until the server gives up on us: how many replies the kernel's socket buffers absorb
        # first depends on loopback autotuning (a fixed 40,000 once all fitted, and the server,
        # never blocked, rightly kept waiting for this peer to read).
        told = threading.Event()
        sent = [0]

        def ping_until_told() -> None:
            while not told.is_set() and sent[0] < 2_000_000:
                _send_all(sock, [_ping(sent[0] + 1)])
                sent[0] += 1

        sender = threading.Thread(target=ping_until_told)
        sender.start()
        peak = 0
        deadline = time.monotonic() + 120
        try:
            while "stopped reading" not in caplog.text:
                assert sender.is_alive(), f"{sent[0]} pings sent and the server never noticed the peer stopped reading"
                assert time.monotonic() < deadline, "the server never noticed the peer stopped reading"
                for stats in server.peer_stats().values():
                    peak = max(peak, stats["pending_bytes"])
                time.sleep(0.005)
        finally:
            told.set()
            sender.join()
        n = sent[0]
        assert peak <= 2 * limit  # bounded: the limit, plus what one poll of the socket thread produced
        # now read: replies in order, then the notice that the rest was discarded
        rids: list[int] = []
        notice: dict[str, Any] | None = None
        while notice is None:
            assert sock.poll(20_000), f"no notice after {len(rids)} replies"
            reply = msgpack.unpackb(sock.recv(), raw=False)
            if "error" in reply:
                notice = reply
            else:
                rids.append(reply["rid"])
        assert notice["rid"] is None and notice["error"]["type"] == "SlowConsumerError"
        assert "discarded" in notice["error"]["message"]
        assert rids == sorted(rids) and len(rids) < n
        # Pings the server read before it gave up may still be answered (and, read slowly on a busy
        # machine, overflow again): drain until the line is quiet, then catch up.
        while sock.poll(2_000):
            sock.recv()
        sock.send(_ping(n + 1))  # caught up: served again
        while True:
            assert sock.poll(20_000)
            reply = msgpack.unpackb(sock.recv(), raw=False)
            if reply.get("rid") == n + 1:
                assert "ok" in reply
                break


_CLIENT = """
import sys, time
from rxruntime.serving.client import Client
from rxruntime.events import Token, AnswerCompleted
client = Client(sys.argv[1], timeout=30)
conv = client.open(sys.argv[2])
if sys.argv[3] == "stream":
    def on_next(event):
        if isinstance(event, Token):
            print("TOKEN", flush=True)
    conv.interact("Hi").subscribe(on_next)
else:
    conv.ask("Hi", max_new_tokens=4)
    print("ANSWERED", flush=True)
time.sleep(600)
"""


def _client_process(endpoint: str, conversation_id: str, mode: str, marker: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CLIENT), endpoint, conversation_id, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == marker, line
    return proc


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_killed_client_has_its_running_turn_cancelled(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rxruntime.serving")
    with engine(model_dir) as eng, serving(eng) as server:
        real_step = eng.model.decode_step

        def slow_endless(*args: Any) -> torch.Tensor:
            time.sleep(0.02)
            out: torch.Tensor = real_step(*args)
            out[:, eng.config.special_tokens.eos_id] = -1e9
            return out

        setattr(eng.model, "decode_step", slow_endless)  # noqa: B010 - the engine is thrown away
        proc = _client_process(server.endpoint, "c", "stream", "TOKEN")
        proc.kill()  # SIGKILL: no goodbye
        proc.wait()
        _wait_for(lambda: eng.history("c"), 20, "the dead client's turn was never stopped")
        assert eng.history("c")[-1]["finish_reason"] == "cancelled"
        assert "is gone" in caplog.text


class SlowStore(InMemoryStore):
    """Persisting takes a while, so a memory update is still running when the client dies."""

    def put(self, state: ConversationState) -> None:
        time.sleep(1.0)
        super().put(state)


def test_a_killed_clients_completed_answer_still_updates_memory(model_dir: Path) -> None:
    store = SlowStore()
    with engine(model_dir, store) as eng, serving(eng) as server:
        proc = _client_process(server.endpoint, "m", "ask", "ANSWERED")
        proc.kill()
        proc.wait()
        assert eng.stm_version("m") == 0  # the update was still running when the client died
        _wait_for(lambda: eng.stm_version("m") == 1, 20, "the memory update of a completed answer was lost")
        stored = store.get("m")
        assert stored is not None and stored.stm_version == 1


def _streams(clients: list[Client], turns: int) -> tuple[list[threading.Event], list[list[Any]]]:
    """Pipelined turns on a few conversations; returns per-stream 'ended' flags and outcomes."""
    ended: list[threading.Event] = []
    outcomes: list[list[Any]] = []
    for client in clients:
        for c in range(3):
            conv = client.open(f"conv-{id(client)}-{c}")
            for t in range(turns):
                done, outcome = threading.Event(), list[Any]()
                ended.append(done)
                outcomes.append(outcome)

                def on_error(exc: Exception, done: threading.Event = done, outcome: list[Any] = outcome) -> None:
                    outcome.append(exc)
                    done.set()

                def on_completed(done: threading.Event = done, outcome: list[Any] = outcome) -> None:
                    outcome.append("completed")
                    done.set()

                conv.interact(f"Hi {t}", max_new_tokens=40).subscribe(lambda e: None, on_error, on_completed)
    return ended, outcomes


@pytest.mark.parametrize("death", ["SIGKILL", "SIGSTOP"])
def test_every_stream_fails_fast_when_the_server_dies(model_dir: Path, tmp_path: Path, death: str) -> None:
    """kill -9 closes the connection; SIGSTOP leaves it open but silent (only heartbeats tell)."""
    port = free_port()
    proc = serve_process(model_dir, port, "--store", "memory://")
    address = f"tcp://127.0.0.1:{port}"
    clients: list[Client] = []
    try:
        wait_until_served(address)
        clients = [Client(address, timeout=30, heartbeat_s=0.5, heartbeat_timeout_s=2.0) for _ in range(2)]
        first_event = threading.Event()
        probe = clients[0].open("probe")
        probe.interact("Hi", max_new_tokens=40).subscribe(lambda e: first_event.set())
        ended, outcomes = _streams(clients, turns=10)
        assert first_event.wait(30)
        os.kill(proc.pid, getattr(signal, death))
        killed_at = time.monotonic()
        for done in ended:
            assert done.wait(max(0.1, killed_at + 8 - time.monotonic())), "a stream still hangs 8 s later"
        failures = [o[0] for o in outcomes if o[0] != "completed"]
        assert failures, "every turn had finished before the server died; the test proved nothing"
        assert all(isinstance(f, ConnectionLost) for f in failures), failures
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for client in clients:
            client.close()
