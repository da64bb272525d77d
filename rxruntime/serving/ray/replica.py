"""The engine replica of the Ray Serve deployment: one engine, the HTTP app around it, Redis behind.

Each replica loads one engine (CPU, or the GPU Serve gave it through ``ray_actor_options``) on a
Redis store, and serves the unchanged HTTP app (``create_app``) through ``AsgiBridge``; what the
single-process front keeps per process (its conversation table, the chat history cache) is in
Redis here (``redis_tables``), so any replica can serve any conversation.

Around every turn of an existing conversation the replica:

1. takes the conversation's lease (``leases``): a turn of it running anywhere else finishes first,
   memory update included; a replica killed mid-turn lets it lapse after ``lease_ttl_s``;
2. checks that the copy it holds open is the store's latest (``Registry.refresh``), else reopens it
   from Redis: a turn never reads an STM older than the last committed one;
3. records whether that was an affinity hit (``router.AffinityStats``);
4. after the response, waits (in the background) for the turn's memory update to commit, then
   gives the lease back. A new conversation's lease is taken as soon as the app names it.

Shutting a replica down (scale-down, redeploy, Ctrl-C) closes the engine, which first commits the
memory updates it owes; the leases are given back as those commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ray import serve

from rxruntime.serving.http.errors import APIError, unavailable
from rxruntime.serving.http.registry import CONVERSATION_HEADER
from rxruntime.serving.ray.asgi import AsgiBridge
from rxruntime.serving.ray.leases import ConversationBusyError, Lease, Leases
from rxruntime.serving.ray.router import AffinityStats, Route

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-rxrt-replica"  # which replica answered: pid@host (tests, debugging affinity)
MAX_WARM = 10_000  # conversation ids a replica reports to Serve's router (as create_app's default bound)


class _Warm:
    """What Serve's multiplexing "loads": nothing but the mark that this replica has the id."""


class EngineReplica:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        store: str,
        *,
        model: str = "default",
        device: str | None = None,
        max_batch: int = 64,
        max_memory_batch: int = 32,
        max_resident_bytes: int | None = None,
        store_writers: int = 4,
        api_keys: Sequence[str] = (),
        model_name: str = "rxt",
        lease_ttl_s: float = 10.0,
        lease_wait_s: float = 60.0,
        max_open_conversations: int = MAX_WARM,
        history_cache_size: int = 512,
        ui: bool = True,
    ) -> None:
        import rxruntime
        from rxruntime.serving.http.app import context_of, create_app
        from rxruntime.serving.ray.redis_tables import SharedConversations, SharedHistoryCache
        from rxruntime.stores import RedisStore, open_store

        _threads_for_assigned_cpus()
        opened = open_store(store)
        if not isinstance(opened, RedisStore):
            raise ValueError(f"replicas share their memory through Redis: --store must be redis://..., not {store!r}")
        self._store = opened
        client = opened.client
        self._leases = Leases(client, ttl_s=lease_ttl_s)
        self._lease_wait_s = lease_wait_s
        self._affinity = AffinityStats(client)
        engine = await asyncio.to_thread(
            rxruntime.load,
            model,
            device=device,
            max_batch=max_batch,
            store=opened,
            max_memory_batch=max_memory_batch,
            max_resident_bytes=max_resident_bytes,
            store_writers=store_writers,
        )
        self._app = create_app(
            engine,
            api_keys=api_keys,
            model_name=model_name,
            owns_engine=True,
            max_open_conversations=max_open_conversations,
            shared=SharedConversations(client),
            history_cache=SharedHistoryCache(client, history_cache_size),
            ui=ui,
        )
        self._ctx = context_of(self._app)
        self._ctx.metrics.registry.register(self._affinity)
        self._bridge = AsgiBridge(self._app)
        await self._bridge.startup()
        self._releases: set[asyncio.Task[None]] = set()
        self._name = f"{os.getpid()}@{socket.gethostname()}"

    @serve.multiplexed(max_num_models_per_replica=MAX_WARM)  # type: ignore[untyped-decorator]
    async def warm(self, key: str) -> _Warm:
        return _Warm()

    async def handle(
        self, method: str, path: str, query: str, headers: Sequence[tuple[str, str]], body: bytes, route: Route
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        """One HTTP request: ``{"status", "headers"}`` then body chunks (a Serve streaming call)."""
        if route.key:
            await self.warm(route.key)
        leases: list[Lease] = []
        try:
            if route.conversation:
                refused = await self._begin_turn(route.conversation, leases)
                if refused is not None:
                    for chunk in _error(refused):
                        yield chunk
                    return
            async for item in self._bridge.request(method, path, query, headers, body):
                if isinstance(item, dict):
                    item["headers"].append((REPLICA_HEADER, self._name))
                    created = dict(item["headers"]).get(CONVERSATION_HEADER)
                    if created and created != route.conversation:  # a new conversation: hold it from now on
                        await self.warm(created)
                        try:
                            leases.append(await self._lease(created, wait_s=0.0))
                        except Exception as exc:
                            log.warning("no lease for new conversation %r: %s", created, exc)
                yield item
        finally:
            for lease in leases:
                task = asyncio.ensure_future(self._release_after_memory(lease))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

    async def ping(self) -> str:
        """Which replica this is (``pid@host``): for tests and operators."""
        return self._name

    async def __del__(self) -> None:
        """Serve's graceful shutdown: close the engine (owed memory updates commit), then the rest."""
        await self._bridge.shutdown()
        if self._releases:
            await asyncio.wait(list(self._releases), timeout=30)
        self._leases.close()
        self._store.close()

    async def _begin_turn(self, conversation_id: str, leases: list[Lease]) -> APIError | None:
        """Take the lease, make sure the open copy is the latest, count the hit; an error to answer, or None."""
        try:
            leases.append(await self._lease(conversation_id))
            fresh = await asyncio.to_thread(self._ctx.registry.refresh, self._ctx.slot.engine, conversation_id)
            await asyncio.to_thread(self._affinity.record, fresh)
        except ConversationBusyError as exc:
            return APIError(409, str(exc), type="invalid_request_error", code="conversation_busy")
        except Exception as exc:  # Redis unreachable: no turn runs without its lease
            self._ctx.metrics.store_errors.inc()
            message = f"the conversation store is unavailable ({type(exc).__name__}: {exc}); nothing was written"
            return unavailable(message, "store_unavailable")
        return None

    async def _lease(self, conversation_id: str, wait_s: float | None = None) -> Lease:
        wait = self._lease_wait_s if wait_s is None else wait_s
        return await asyncio.to_thread(self._leases.acquire, conversation_id, wait)

    async def _release_after_memory(self, lease: Lease) -> None:
        """Give the lease back once the turn's memory update has committed (or failed)."""
        entry = self._ctx.registry.entry(lease.conversation_id)
        if entry is not None:
            with contextlib.suppress(Exception):  # closed or deleted meanwhile: nothing more will be written
                await asyncio.to_thread(entry.conv.wait_for_memory, self._leases.ttl_s * 30)
        await asyncio.to_thread(lease.release)


def _threads_for_assigned_cpus() -> None:
    """As many torch threads as CPUs Serve reserved for this replica (``ray_actor_options``), so
    replicas on one machine do not oversubscribe its cores; at least one."""
    import math

    import ray
    import torch

    if not ray.is_initialized():  # not inside a Ray worker (the drain test builds a replica in-process)
        return
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")  # type: ignore[no-untyped-call]
    if cpus:
        torch.set_num_threads(max(1, math.floor(cpus)))


def _error(error: APIError) -> list[dict[str, Any] | bytes]:
    response = error.response()
    return [{"status": response.status_code, "headers": [("content-type", "application/json")]}, bytes(response.body)]
