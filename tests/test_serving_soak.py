"""The fault soak at CI size (benchmarks/soak.py runs the same scenarios at full size)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.harness import soak
from benchmarks.harness.redis_server import RedisServer

from .serving_util import write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_model(tmp_path_factory.mktemp("model")))


def test_garbage_changes_no_memory_and_every_frame_is_answered(model: str) -> None:
    result = soak.garbage(model, conversations=3, turns=2, frames=600)
    assert result["frames_answered"] == 600 and result["memories_bit_identical"] == 3, result


def test_kill_9_during_memory_updates_loses_nothing_acknowledged_sqlite(model: str, tmp_path: Path) -> None:
    result = soak.crashes(model, f"sqlite:///{tmp_path / 'soak.db'}", rounds=2, conversations=4)
    assert result["ok"] and result["acknowledged_updates"] > 0, result


def test_kill_9_during_memory_updates_loses_nothing_acknowledged_redis(model: str) -> None:
    with RedisServer() as redis:  # a real server (Debian's, else the test extra's valkey)
        result = soak.crashes(model, redis.url, rounds=2, conversations=4)
    assert result["ok"] and result["acknowledged_updates"] > 0, result


def test_pipelined_turns_lose_duplicate_or_reorder_no_event(model: str) -> None:
    result = soak.pipelined(model, conversations=20, turns=3, clients=2)
    assert result["ok"], result


def test_a_slow_reader_loses_nothing(model: str) -> None:
    assert soak.slow_reader(model, requests=1000)["ok"]


def test_another_key_is_refused_every_operation(model: str) -> None:
    result = soak.cross_tenant(model)
    assert result["ok"], result
