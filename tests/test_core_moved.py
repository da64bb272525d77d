"""The module names the core had before its floors (rxruntime/_moved.py) still import, warn that
they moved, and give the very objects of their new homes."""

from __future__ import annotations

import importlib
import sys

import pytest

from rxruntime import backend, conversation, events, options
from rxruntime._moved import CORE, ENGINE
from rxruntime.engine import scheduler

CASES = [
    ("rxruntime.mailbox", "Mailbox", events.Mailbox),
    ("rxruntime.streams", "EventBuffer", conversation.EventBuffer),
    ("rxruntime.engine.options", "check_options", options.check_options),
    ("rxruntime.engine.protocol", "Backend", backend.Backend),
    ("rxruntime.engine.state", "ConvState", scheduler.ConversationEntry),
    ("rxruntime.engine.records", "ConversationEntry", scheduler.ConversationEntry),
]


def test_every_moved_name_is_covered() -> None:
    covered = {old for old, _, _ in CASES}
    assert covered == {f"rxruntime.{n}" for n in CORE} | {f"rxruntime.engine.{n}" for n in ENGINE}


@pytest.mark.parametrize(("old", "attr", "new"), CASES, ids=[c[0] for c in CASES])
def test_old_module_names_import_with_a_warning(old: str, attr: str, new: object) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    assert getattr(module, attr) is new
    with pytest.raises(AttributeError, match="has no attribute"):
        _ = module.no_such_name
