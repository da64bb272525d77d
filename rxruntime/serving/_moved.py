"""The module names ``rxruntime.serving`` had before its fronts got rooms of their own, kept importable.

Until issue 25 every module sat flat in ``serving/`` (``http_app``, ``ray_replica``, ``auth``,
``protocol``...). Each old name below still imports: it is a thin module whose attributes are
those of its new home(s), the very same objects. The names the docs and examples showed
(``auth``, ``http_app``, ``http_serve``, and ``ray_app``, which Serve config files name) import
silently; the others warn with a ``DeprecationWarning`` naming the new home. ``client`` needs no
entry: ``serving/client.py`` is still the client's public face.

One finder for the whole table keeps ``serving/`` to its three rooms instead of thirty alias files.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

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


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != _PACKAGE or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader())


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return None  # a plain module, filled in by exec_module

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        targets, documented = MOVED[old.rpartition(".")[2]]
        names = [f"{_PACKAGE}.{target}" for target in targets]
        homes = [importlib.import_module(name) for name in names]

        def __getattr__(attr: str) -> Any:
            for home in homes:
                if hasattr(home, attr):
                    return getattr(home, attr)
            raise AttributeError(f"module {old!r} (moved to {' and '.join(names)}) has no attribute {attr!r}")

        module.__doc__ = f"Moved to {' and '.join(names)}."
        setattr(module, "__getattr__", __getattr__)  # noqa: B010  # PEP 562: attributes come from the new homes
        setattr(module, "__dir__", lambda: sorted({a for home in homes for a in dir(home)}))  # noqa: B010
        if not documented:
            # stacklevel 2 skips the import machinery's frames: the warning names the importing module
            warnings.warn(f"{old} moved to {' and '.join(names)}", DeprecationWarning, stacklevel=2)


def install() -> None:
    """Make the old names importable (after every real module: this finder never shadows one)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
