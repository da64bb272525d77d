"""The module names ``rxruntime.serving`` had before its fronts got rooms of their own, kept importable.

Until issue 25 every module sat flat in ``serving/`` (``http_app``, ``ray_replica``, ``auth``,
``protocol``...). Each old name below still imports: it is a thin module whose attributes are
those of its new home(s), the very same objects. The names the docs and examples showed
(``auth``, ``http_app``, ``http_serve``, and ``ray_app``, which Serve config files name) import
silently; the others warn with a ``DeprecationWarning`` naming the new home. ``client`` needs no
entry: ``serving/client.py`` is still the client's public face.

One finder for the whole table (rxruntime/_moved.py) keeps ``serving/`` to its three rooms instead
of thirty alias files.
"""

from __future__ import annotations

from rxruntime import _moved

_PACKAGE = "rxruntime.serving"

# old name -> (its new home(s) under rxruntime.serving, whether the docs showed it: then no warning)
MOVED: dict[str, tuple[tuple[str, ...], bool]] = {
    "auth": (("zmq.curve",), True),
    "conversations": (("zmq.conversations",), False),
    "errors": (("zmq.errors",), False),
    "peers": (("zmq.peers",), False),
    "protocol": (("zmq.wire",), False),
    "tenants": (("ownership",), False),
    "zmq_server": (("zmq.server",), False),
    "http_app": (("http.app",), True),
    "http_auth": (("http.bearer", "ownership"), False),
    "http_chat": (("http.routes.chat_completions", "http.messages"), False),
    "http_context": (("http.context",), False),
    "http_conversations": (("http.routes.conversations", "http.messages"), False),
    "http_errors": (("http.errors",), False),
    "http_fields": (("http.fields", "http.messages"), False),
    "http_history": (("http.history_cache",), False),
    "http_history_shared": (("ray.redis_tables",), False),
    "http_lifecycle": (("http.context",), False),
    "http_metrics": (("http.metrics",), False),
    "http_registry": (("http.registry",), False),
    "http_replay": (("http.replay",), False),
    "http_responses": (("http.routes.responses", "http.messages"), False),
    "http_serve": (("http.serve",), True),
    "http_shared": (("ray.redis_tables",), False),
    "http_sse": (("http.turns",), False),
    "http_status": (("http.routes.status",), False),
    "http_turns": (("http.turns",), False),
    "leases": (("ray.leases",), False),
    "ray_app": (("ray.app",), True),
    "ray_asgi": (("ray.asgi",), False),
    "ray_ingress": (("ray.ingress",), False),
    "ray_replica": (("ray.replica",), False),
    "ray_router": (("ray.router",), False),
}


def install() -> None:
    """Make the old names importable (after every real module: this finder never shadows one)."""
    _moved.install(_PACKAGE, MOVED)
