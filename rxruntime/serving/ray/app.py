"""The Ray Serve application: an HTTP ingress in front of engine replicas, Redis as the memory of record.

Two deployments: ``rxrt-ingress`` (``ingress.Ingress``, no model, routes by conversation) and
``rxrt-engine`` (``replica.EngineReplica``, one engine each, CPU or a GPU through
``ray_actor_options``). ``application`` builds them from Python; ``build`` is the same for Serve's
own tools, taking the ``args`` of a Serve config file (``rxruntime/serving/ray/config.yaml``):

    serve run rxruntime/serving/ray/config.yaml        # or: serve deploy ... on a running cluster

``rxrt serve --ray`` starts (or, with ``RAY_ADDRESS``, joins) a cluster and calls ``run``. Only the
HTTP front is deployed on Ray; the zmq front stays single-process (``rxrt serve --bind``).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from rxruntime.serving.ray.ingress import Ingress
from rxruntime.serving.ray.replica import EngineReplica

APP_NAME = "rxrt"
ENGINE = "rxrt-engine"
INGRESS = "rxrt-ingress"


def application(
    store: str,
    *,
    replicas: int = 2,
    autoscaling: dict[str, Any] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_ongoing_requests: int = 64,
    graceful_shutdown_timeout_s: float = 60.0,
    **engine: Any,
) -> Application:
    """The bound application. ``engine`` goes to each ``EngineReplica`` (model, device, api_keys,
    lease_ttl_s, ...). ``autoscaling`` (Serve's ``autoscaling_config``, on queue length:
    ``target_ongoing_requests``) replaces the fixed ``replicas``."""
    scale: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    replica = serve.deployment(
        name=ENGINE,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests,
        # a replica being scaled away finishes its requests, then __del__ commits owed memory updates
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        **scale,
    )(EngineReplica)
    ingress = serve.deployment(
        name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000
    )(Ingress)
    return ingress.bind(replica.bind(store, **engine))


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder (``import_path: rxruntime.serving.ray.app:build``)."""
    options = dict(args)
    store = options.pop("store", None)
    if not isinstance(store, str):
        raise ValueError("args.store is required: redis://HOST:PORT/DB, the memory every replica shares")
    return application(store, **options)


def run(app: Application, host: str, port: int, *, blocking: bool = False) -> None:
    """Start Serve's HTTP proxy on ``host:port`` and deploy ``app`` at ``/`` (returns once it is up)."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
