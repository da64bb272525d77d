"""The module names serving/ had before its rooms (rxruntime/serving/_moved.py) still import: the
documented ones silently, the others with a DeprecationWarning, every one giving the same objects."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

import pytest

from rxruntime.serving._moved import MOVED

UNDOCUMENTED = sorted(name for name, (_, documented) in MOVED.items() if not documented)
DOCUMENTED = sorted(name for name, (_, documented) in MOVED.items() if documented)


def _fresh_import(name: str) -> ModuleType:
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.parametrize("old", UNDOCUMENTED)
def test_an_undocumented_old_name_warns_and_gives_its_new_homes_objects(old: str) -> None:
    homes, _ = MOVED[old]
    with pytest.warns(DeprecationWarning, match=rf"rxruntime\.serving\.{old} moved to rxruntime\.serving\."):
        module = _fresh_import(f"rxruntime.serving.{old}")
    for home in homes:
        new = importlib.import_module(f"rxruntime.serving.{home}")
        public = [name for name in vars(new) if not name.startswith("_") and name != "annotations"]
        assert public, home
        for name in public:
            assert getattr(module, name) is getattr(new, name), (old, name)


@pytest.mark.parametrize("old", [*DOCUMENTED, "client"])
def test_a_documented_old_name_imports_without_a_warning(old: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = _fresh_import(f"rxruntime.serving.{old}")
    assert module.__name__ == f"rxruntime.serving.{old}"


def test_the_documented_names_are_the_objects_of_their_new_homes() -> None:
    from rxruntime import client, server
    from rxruntime.serving import client as public_client
    from rxruntime.serving.auth import ClientKeys, ServerKeys, generate_keys  # type: ignore[import-not-found]
    from rxruntime.serving.http import app, serve
    from rxruntime.serving.http_app import context_of, create_app  # type: ignore[import-not-found]
    from rxruntime.serving.http_serve import ThreadedServer  # type: ignore[import-not-found]
    from rxruntime.serving.ray import app as ray_app
    from rxruntime.serving.ray_app import build  # type: ignore[import-not-found]
    from rxruntime.serving.zmq import client as zmq_client
    from rxruntime.serving.zmq import curve
    from rxruntime.serving.zmq import server as zmq_server

    assert (ClientKeys, ServerKeys, generate_keys) == (curve.ClientKeys, curve.ServerKeys, curve.generate_keys)
    assert (create_app, context_of, ThreadedServer) == (app.create_app, app.context_of, serve.ThreadedServer)
    assert build is ray_app.build
    assert client.Client is public_client.Client is zmq_client.Client
    assert public_client.ClientKeys is curve.ClientKeys
    assert server.Server is zmq_server.Server


def test_moved_functions_keep_their_second_home() -> None:
    """``http_auth`` held the owner-in-the-id functions, now in ``ownership``; ``http_fields`` held
    ``message_text``, now in ``http.messages``."""
    from rxruntime.serving import ownership
    from rxruntime.serving.http import messages

    with pytest.warns(
        DeprecationWarning, match="moved to rxruntime.serving.http.bearer and rxruntime.serving.ownership"
    ):
        auth = _fresh_import("rxruntime.serving.http_auth")
    with pytest.warns(
        DeprecationWarning, match="moved to rxruntime.serving.http.fields and rxruntime.serving.http.messages"
    ):
        fields = _fresh_import("rxruntime.serving.http_fields")
    assert (auth.new_id, auth.owns, auth.owner_tag) == (ownership.new_id, ownership.owns, ownership.owner_tag)
    assert fields.message_text is messages.message_text
    with pytest.raises(AttributeError, match="moved to rxruntime.serving.http.fields"):
        _ = fields.no_such_name


def test_a_name_that_never_existed_still_fails_to_import() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("rxruntime.serving.http_nothing")
