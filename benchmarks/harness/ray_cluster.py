"""A throwaway local Ray cluster on loopback with rxruntime's Serve application deployed, for the
Ray tests, the failover script and the scaling benchmark (``with LocalRayServe(redis.url) as rs``).

It starts Ray in this process (no dashboard, every address on 127.0.0.1, a free port for Serve's
HTTP proxy), deploys ``ray_app.application`` and waits until every engine replica answers. Its
helpers find the replicas' processes (to ``kill -9`` one) and wait for Serve to replace them.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from .redis_server import free_port


class LocalRayServe:
    def __init__(self, store: str, *, replicas: int = 2, cluster_cpus: int = 4, **options: Any) -> None:
        """``options`` go to ``ray_app.application`` (per-replica ``num_cpus``, ``lease_ttl_s``, ...)."""
        self.store = store
        self.replicas = replicas
        self.cluster_cpus = cluster_cpus
        self.options = options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalRayServe:
        import ray

        from rxruntime.serving.ray.app import application, run

        ray.init(
            num_cpus=self.cluster_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            run(application(self.store, replicas=self.replicas, **self.options), "127.0.0.1", self.port)
            self.wait_for_replicas(self.replicas)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()

    def replica_pids(self) -> list[int]:
        """The processes of the live engine replicas."""
        import ray

        from rxruntime.serving.ray.app import APP_NAME, ENGINE

        actors = ray._private.state.actors()  # the GCS actor table; needs no dashboard
        name = f"ServeReplica:{APP_NAME}:{ENGINE}"
        return sorted(
            int(a["Pid"]) for a in actors.values() if a.get("ActorClassName") == name and a.get("State") == "ALIVE"
        )

    def wait_for_replicas(self, n: int, timeout: float = 180.0, exclude: frozenset[int] = frozenset()) -> list[int]:
        """Wait until ``n`` engine replicas (none of them in ``exclude``) are up and serving."""
        from ray import serve

        from rxruntime.serving.ray.app import APP_NAME, ENGINE

        deadline = time.monotonic() + timeout
        while True:
            pids = [p for p in self.replica_pids() if p not in exclude]
            status = serve.status().applications.get(APP_NAME)
            states = status.deployments[ENGINE].replica_states if status is not None else {}
            running = sum(count for state, count in states.items() if str(state).endswith("RUNNING")) >= n
            if len(pids) >= n and running and status is not None and status.status == "RUNNING":
                return pids
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} engine replicas not running after {timeout:.0f} s (pids {pids}, {status})")
            time.sleep(0.5)
