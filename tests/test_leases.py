"""Per-conversation leases (rxruntime/serving/ray/leases.py) against a real redis-server, and the
shared tables the Ray replicas keep in it: one turn of a conversation at a time anywhere, a dead
holder's lease lapsing, a lapsed holder never freeing its successor's lease."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import torch

import rxruntime
from benchmarks.harness.redis_server import RedisServer
from rxruntime.serving.http.metrics import Metrics
from rxruntime.serving.http.registry import Registry, SharedMeta
from rxruntime.serving.ray.leases import ConversationBusyError, Leases
from rxruntime.serving.ray.redis_tables import SharedConversations, SharedHistoryCache
from rxruntime.serving.ray.router import AffinityStats
from rxruntime.stores import RedisStore


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with RedisServer() as server:  # a real server (Debian's, else the test extra's valkey)
        conn = redis.Redis.from_url(server.url)
        yield conn
        conn.close()


def test_a_lease_excludes_every_other_holder_until_released(client: Any) -> None:
    a, b = Leases(client, ttl_s=5), Leases(client, ttl_s=5)
    try:
        lease = a.acquire("conv_x")
        with pytest.raises(ConversationBusyError, match="another turn of it is still running"):
            b.acquire("conv_x", wait_s=0.2)
        with pytest.raises(ConversationBusyError):
            a.acquire("conv_x", wait_s=0.2)  # the same process's next turn waits too
        got: list[float] = []

        def wait_for_it() -> None:
            b.acquire("conv_x", wait_s=10).release()
            got.append(time.monotonic())

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.3)
        assert not got  # still held
        released = time.monotonic()
        lease.release()
        waiter.join(10)
        assert got and got[0] >= released
        a.acquire("conv_y").release()  # another conversation was never blocked
        handed = a.acquire("conv_x", wait_s=1)  # b released it
        threading.Timer(0.2, handed.release).start()
        a.acquire("conv_x", wait_s=5).release()  # handed over in-process, on release
    finally:
        a.close()
        b.close()


def test_a_dead_holders_lease_lapses_and_a_live_holders_is_renewed(client: Any) -> None:
    live, dead, other = Leases(client, ttl_s=0.6), Leases(client, ttl_s=0.6), Leases(client, ttl_s=0.6)
    try:
        kept = live.acquire("conv_live")
        dead.acquire("conv_dead")
        dead.close()  # stops renewing, as a process killed with kill -9 would
        time.sleep(1.5)  # more than two TTLs
        with pytest.raises(ConversationBusyError):
            other.acquire("conv_live", wait_s=0.1)  # renewed all along
        other.acquire("conv_dead", wait_s=2).release()  # lapsed: the conversation moves on
        assert not kept.lost
    finally:
        live.close()
        other.close()


def test_a_lapsed_holder_cannot_release_its_successors_lease(client: Any) -> None:
    slow, next_holder = Leases(client, ttl_s=0.3), Leases(client, ttl_s=5)
    try:
        stale = slow.acquire("conv_z")
        slow.close()  # paused past its TTL
        time.sleep(0.6)
        successor = next_holder.acquire("conv_z", wait_s=2)
        stale.release()  # token differs: does nothing
        with pytest.raises(ConversationBusyError):
            Leases(client, ttl_s=5).acquire("conv_z", wait_s=0.1)
        successor.release()
    finally:
        next_holder.close()


def test_shared_conversation_table_round_trips(client: Any) -> None:
    table = SharedConversations(client)
    assert table.load("conv_none") is None
    table.create("conv_m", SharedMeta(123, {"user": "julia"}))
    table.set_last_response("conv_m", 4)
    table.set_metadata("conv_m", {"user": "ada"})
    assert table.load("conv_m") == SharedMeta(123, {"user": "ada"}, 4)
    table.create("conv_s", SharedMeta(7, seed=2**63 - 1))
    assert table.load("conv_s") == SharedMeta(7, seed=2**63 - 1)
    table.delete("conv_m")
    assert table.load("conv_m") is None


def test_shared_history_cache_serves_another_replicas_stm(client: Any) -> None:
    one, two = SharedHistoryCache(client, 8), SharedHistoryCache(client, 8)
    stm = torch.randn(2, 4, 8).to(torch.bfloat16)
    one.put("k2", stm)
    assert two.longest(["k0", "k1", "k3"]) is None
    found = two.longest(["k0", "k1", "k2", "k3"])
    assert found is not None and found[0] == 2
    shared = found[1].result()
    assert shared is not None and torch.equal(shared, stm)


def test_affinity_counts_are_shared(client: Any) -> None:
    a, b = AffinityStats(client, "rxrt:test-affinity"), AffinityStats(client, "rxrt:test-affinity")
    a.record(True)
    b.record(True)
    b.record(False)
    assert a.counts() == (2, 1)
    ratio = {m.name: m.samples[0].value for m in a.collect() if m.name == "rxrt_affinity_hit_ratio"}
    assert ratio["rxrt_affinity_hit_ratio"] == pytest.approx(2 / 3)


def test_a_seeded_conversation_opened_on_another_replica_starts_from_the_creators_memory(client: Any) -> None:
    """Under Ray the next request of a new conversation may reach a replica that has never seen it,
    before any memory update reached the store: it must open from the creator's seed, not its own."""
    shared = SharedConversations(client)
    with (
        rxruntime.load("small", store=RedisStore(client=client)) as here,
        rxruntime.load("small", store=RedisStore(client=client)) as there,
    ):
        creator = Registry(Metrics(here.stats), shared=shared)
        other = Registry(Metrics(there.stats), shared=shared)
        entry = creator.create(here, "", seed=42)
        opened = other.get(there, "", entry.conv.id)
        reference = there.conversation(seed=42)
        try:
            assert torch.equal(there.snapshot(opened.conv.id)[0], there.snapshot(reference.id)[0])
            assert torch.equal(here.snapshot(entry.conv.id)[0], there.snapshot(reference.id)[0])
        finally:
            reference.close()
