"""``rxrt serve --max-memory-batch / --max-resident-bytes / --store-writers``: the sizes the flags
accept and refuse (argparse's error names the flag), and the values reaching the ``Engine`` that
each front builds: ``_load`` (the zmq and ``--http`` fronts both serve its engine) and, for
``--ray``, the keywords ``application`` receives, given to a real ``EngineReplica`` on Redis."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import signal
from typing import Any

import pytest

import rxruntime
import rxruntime.serving.ray.app as ray_app
from benchmarks.harness.redis_server import RedisServer
from rxruntime.cli import build_parser, main
from rxruntime.commands import ENGINE_DEFAULTS, parse_size
from rxruntime.commands.serve import _load
from rxruntime.engine import Engine
from rxruntime.serving.ray.replica import EngineReplica
from rxruntime.stores import open_store

FLAGS = ["--max-memory-batch", "5", "--max-resident-bytes", "3MiB", "--store-writers", "2"]


def _serve_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--model", "small", "--store", "memory://", *extra])


def _engine_values(engine: Engine) -> tuple[int, int | None, int]:
    writers = engine._memory._writers
    assert writers is not None  # the engine has a store
    return engine._memory.max_batch, engine._sched.max_resident_bytes, len(writers._threads)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("512MiB", 512 * 2**20),
        ("4GB", 4 * 10**9),
        ("2G", 2 * 2**30),
        ("2g", 2 * 2**30),
        ("64k", 64 * 1024),
        ("10 KB", 10_000),
        ("1.5GiB", 3 * 2**29),
        ("1TiB", 2**40),
        ("7b", 7),
    ],
)
def test_sizes_in_bytes_and_with_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("lots", "is not a size"),
        ("", "is not a size"),
        ("-5", "is not a size"),
        ("4 XB", "is not a size"),
        ("1e9", "is not a size"),
        ("4 G B", "is not a size"),
        ("0", "more than 0 bytes"),
        ("0GiB", "more than 0 bytes"),
        ("1.1KiB", "not a whole number of bytes"),
    ],
)
def test_bad_sizes_are_refused(text: str, why: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        parse_size(text)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-resident-bytes", "lots", "argument --max-resident-bytes: 'lots' is not a size"),
        ("--max-resident-bytes", "0", "argument --max-resident-bytes: '0' must be more than 0 bytes"),
        ("--max-memory-batch", "0", "argument --max-memory-batch: must be an integer >= 1, got 0"),
        ("--max-memory-batch", "2.5", "argument --max-memory-batch: must be an integer >= 1, got '2.5'"),
        ("--store-writers", "-1", "argument --store-writers: must be an integer >= 1, got -1"),
        ("--store-writers", "four", "argument --store-writers: must be an integer >= 1, got 'four'"),
    ],
)
def test_bad_values_are_argparse_errors_naming_the_flag(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", flag, value])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_flags_default_to_the_engines_own_defaults() -> None:
    """One set of defaults: the flags', ``rxruntime.load``'s and the replica's are ``Engine``'s."""
    for function in (Engine.__init__, rxruntime.load, EngineReplica.__init__):
        parameters = inspect.signature(function).parameters
        assert {name: parameters[name].default for name in ENGINE_DEFAULTS} == ENGINE_DEFAULTS, function
    args = _serve_args()
    assert {name: getattr(args, name) for name in ENGINE_DEFAULTS} == ENGINE_DEFAULTS


def test_the_flags_reach_the_engine_that_serve_builds() -> None:
    store = open_store("memory://")
    with _load(_serve_args(*FLAGS), store) as engine:
        assert _engine_values(engine) == (5, 3 * 2**20, 2)
    with _load(_serve_args(), store) as engine:
        assert _engine_values(engine) == (32, None, 4)
    store.close()


@pytest.mark.timeout(300)
def test_serve_ray_gives_the_flags_to_each_replicas_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """``rxrt serve --ray``'s keywords to ``application`` (recorded on the way, then the deployment
    stops short of Ray) are what Serve gives every ``EngineReplica``: one built from them here
    serves an engine with the flags' values."""
    import ray

    given: dict[str, Any] = {}
    real_application = ray_app.application

    def application(store: str, **options: Any) -> Any:
        given.update(options)
        return real_application(store, **options)

    def run(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # stop before deploying: no cluster in this test

    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray_app, "application", application)
    monkeypatch.setattr(ray_app, "run", run)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with RedisServer() as redis:
        try:
            code = main(["serve", "--ray", "--http", "127.0.0.1:0", "--store", redis.url, "--model", "small", *FLAGS])
        finally:  # serve installed its StopSignals: give pytest its Ctrl-C back
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        assert code == 130
        replica_options = {
            name: given[name] for name in inspect.signature(EngineReplica.__init__).parameters if name in given
        }
        assert {"model", "max_memory_batch", "max_resident_bytes", "store_writers"} <= set(replica_options)
        values = asyncio.run(_replica_engine_values(redis.url, replica_options))
    assert values == (5, 3 * 2**20, 2)


async def _replica_engine_values(url: str, options: dict[str, Any]) -> tuple[int, int | None, int]:
    replica = EngineReplica.__new__(EngineReplica)
    await replica.__init__(url, **options)  # type: ignore[misc]  # Serve awaits it the same way
    try:
        return _engine_values(replica._ctx.slot.engine)
    finally:
        await replica.__del__()
