"""CURVE authentication, `rxrt keygen`, and ownership: another identity's conversation is, for
every operation, indistinguishable from one that does not exist."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from rxruntime import ConversationError
from rxruntime.events import Event, Token
from rxruntime.models.errors import ConfigError
from rxruntime.serving.client import Client, RemoteConversation
from rxruntime.serving.zmq.curve import ClientKeys, ServerKeys, generate_keys
from rxruntime.serving.zmq.errors import AuthenticationError, ConnectionLost
from rxruntime.serving.zmq.server import Server, is_loopback
from rxruntime.stores import SQLiteStore

from .serving_util import engine, free_port, serve_process, serving, wait_until_served, write_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    out = subprocess.run(
        [sys.executable, "-m", "rxruntime.cli", "keygen", str(root), "--clients", "alice", "bob"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "rxrt serve --keys" in out.stdout
    return root


def test_keygen_writes_zmq_certificates_with_private_secrets(keys: Path) -> None:
    for secret in [keys / "server.key_secret", keys / "clients/alice.key_secret", keys / "clients/bob.key_secret"]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == ["alice.key", "bob.key"]
    assert not list((keys / "authorized").glob("*secret*"))  # the server never holds client secrets
    server, alice = ServerKeys.load(keys), ClientKeys.load(keys, "alice")
    assert alice.server_public == server.public and alice.public != ClientKeys.load(keys, "bob").public
    with pytest.raises(ConfigError, match="exists"):
        generate_keys(keys, ["alice"])  # never overwrites a client's keys


def test_only_listed_keys_get_in(keys: Path, model_dir: Path, tmp_path: Path) -> None:
    stranger_dir = tmp_path / "other"
    generate_keys(stranger_dir, ["mallory"])  # a valid keypair the server was never told about
    with engine(model_dir) as eng, serving(eng, keys=ServerKeys.load(keys)) as server:
        with Client(server.endpoint, keys=ClientKeys.load(keys, "alice"), timeout=20) as alice:
            assert alice.ping()["auth"] == "curve"
            assert isinstance(alice.open("a").ask("Hi", max_new_tokens=2), str)
        mallory = ClientKeys.load(stranger_dir, "mallory")
        right_server = ClientKeys(mallory.public, mallory.secret, ServerKeys.load(keys).public)
        for mallory_keys in (right_server, mallory):  # refused by the authenticator; wrong server key
            with Client(server.endpoint, keys=mallory_keys, timeout=20) as client, pytest.raises(AuthenticationError):
                client.ping()
        with Client(server.endpoint, timeout=3) as anonymous, pytest.raises((TimeoutError, ConnectionLost)):
            anonymous.ping()  # no CURVE at all: never gets an answer


def test_a_public_bind_needs_keys_or_insecure(model_dir: Path, keys: Path) -> None:
    assert is_loopback("tcp://127.0.0.1:1") and is_loopback("tcp://[::1]:1") and is_loopback("ipc:///tmp/x")
    assert not is_loopback("tcp://*:1") and not is_loopback("tcp://0.0.0.0:1") and not is_loopback("tcp://eth0:1")
    with engine(model_dir) as eng:
        with pytest.raises(ConfigError, match="without authentication"):
            Server(eng, "tcp://0.0.0.0:*")
        Server(eng, "tcp://0.0.0.0:*", insecure=True).start().stop()
        Server(eng, "tcp://0.0.0.0:*", keys=ServerKeys.load(keys)).start().stop()
    proc = subprocess.run(
        [sys.executable, "-m", "rxruntime.cli", "serve", "--model", str(model_dir), "--bind", f"tcp://*:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--insecure" in proc.stderr


def _unknown_message(exc: BaseException, cid: str) -> str:
    return str(exc).replace(repr(cid), "<id>")


def _cross_tenant_attempts(owner: Client, other: Client, *, namespaced: bool) -> None:
    """``other`` tries every operation on ``owner``'s conversation 'ada'."""
    ada = owner.open("ada")
    ada.ask("Hi, I'm Ada.", max_new_tokens=4)
    before = ada.export_state()
    # what an unknown id looks like to `other`, operation by operation
    expected: dict[str, tuple[type[BaseException], str]] = {}
    for op in ("interact", "export", "close", "delete"):
        fields: dict[str, Any] = {"conversation_id": "never-opened"}
        if op == "interact":
            fields["query"] = "hi"
        with pytest.raises(ConversationError) as info:
            other.call(op, **fields)
        expected[op] = (type(info.value), _unknown_message(info.value, "never-opened"))
    for op in ("interact", "export", "close", "delete"):
        fields = {"conversation_id": "ada"}
        if op == "interact":
            fields["query"] = "What is my name?"
        with pytest.raises(ConversationError) as info:
            other.call(op, **fields)
        assert (type(info.value), _unknown_message(info.value, "ada")) == expected[op], op
    with pytest.raises(ConversationError):  # the remote API says the same
        RemoteConversation(other, "ada").ask("What is my name?")
    # cancel: `other` names the owner's running stream; it is not found, the stream carries on
    tokens = threading.Event()
    done = threading.Event()

    def on_next(event: Event) -> None:
        if isinstance(event, Token):
            tokens.set()

    ada.interact("Tell me more", max_new_tokens=30).subscribe(on_next, on_completed=done.set)
    assert tokens.wait(20)
    owner_rid = max(owner._handlers)
    assert other.call("cancel", target=owner_rid) == {"cancelled": False}
    assert done.wait(20)
    # restore-over: a snapshot naming 'ada' never lands on the owner's conversation
    forged = type(before)("ada", 99, 5, torch.zeros_like(before.stm), before.config_fingerprint)
    if namespaced:  # with keys, other's 'ada' is other's own conversation
        assert other.restore(forged).export_state().stm_version == 5
    else:
        with pytest.raises(ConversationError) as info:
            other.restore(forged)
        assert _unknown_message(info.value, "ada") == expected["interact"][1]
    after = ada.export_state()
    assert after.stm_version == before.stm_version + 1  # only the owner's own second turn
    assert not torch.equal(after.stm, torch.zeros_like(after.stm))
    assert ada.ask("still mine?", max_new_tokens=2) is not None


def test_with_keys_conversations_belong_to_the_key(keys: Path, model_dir: Path, tmp_path: Path) -> None:
    with engine(model_dir, SQLiteStore(tmp_path / "s.db")) as eng, serving(eng, keys=ServerKeys.load(keys)) as server:
        alice_keys, bob_keys = ClientKeys.load(keys, "alice"), ClientKeys.load(keys, "bob")
        with (
            Client(server.endpoint, keys=alice_keys, timeout=20) as alice,
            Client(server.endpoint, keys=bob_keys, timeout=20) as bob,
        ):
            _cross_tenant_attempts(alice, bob, namespaced=True)
            assert bob.open("ada").id == "ada"  # bob's own 'ada' (restored above), not alice's
            assert RemoteConversation(bob, "ada").export_state().stm_version == 5
        # a reconnect with the same key is the same owner
        with Client(server.endpoint, keys=alice_keys, timeout=20) as alice_again:
            assert RemoteConversation(alice_again, "ada").export_state().stm_version == 3  # the owner's three turns


def test_without_keys_a_conversation_belongs_to_its_connection(model_dir: Path) -> None:
    with (
        engine(model_dir) as eng,
        serving(eng) as server,
        Client(server.endpoint, timeout=20) as first,
        Client(server.endpoint, timeout=20) as second,
    ):
        _cross_tenant_attempts(first, second, namespaced=False)


def test_a_dead_connection_releases_what_it_owned(model_dir: Path, tmp_path: Path) -> None:
    with engine(model_dir, SQLiteStore(tmp_path / "s.db")) as eng, serving(eng, peer_timeout_s=1.0) as server:
        with Client(server.endpoint, timeout=20) as first:
            first.open("ada").ask("Hi", max_new_tokens=2)
        deadline = time.monotonic() + 20
        with Client(server.endpoint, timeout=20) as second:
            while True:
                try:
                    RemoteConversation(second, "ada").export_state()
                    break
                except ConversationError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)


def test_rxrt_serve_with_keys(keys: Path, model_dir: Path) -> None:
    port = free_port()
    proc = serve_process(model_dir, port, "--keys", str(keys), "--store", "memory://")
    address = f"tcp://127.0.0.1:{port}"
    try:
        alice = ClientKeys.load(keys, "alice")
        wait_until_served(address, keys=alice)
        with Client(address, keys=alice, timeout=30) as client:
            assert client.ping()["auth"] == "curve"
            assert isinstance(client.open("x").ask("Hi", max_new_tokens=2), str)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "CURVE keys" in out
