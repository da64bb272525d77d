"""The ``hand_written`` evaluation split: dialogues a person wrote, not a grammar.

Every other split of ``rxrt eval memory`` is rendered by the people generator, so a model that
learnt the generator's frames scores there without understanding a fact said any other way.
``hand_written.json`` (beside this module) holds 48 dialogues written by hand: introductions,
asides, facts inside longer sentences, corrections, several facts in one turn and questions about
facts never stated, each asked in its own words. No training generator renders any of its
sentences or value/question pairs (``tests/test_hand_written_split.py`` checks a large sample), so
the split measures recall of facts stated the way people state them.

A probe at gap ``k`` is an item's turns, ``k - 1`` hand-written small-talk turns, then its
question: the question comes ``k`` turns after the item's last turn. The expected answer is the
slot's answer form with the value ("Your name is Marguerite."), or the slot's "I don't know ...".
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .dialogues import Dialogue, Turn, TurnKind
from .grammar import render
from .loaders import DataError
from .phrasings import PHRASINGS

DATA_FILE = "hand_written.json"
CATEGORIES = ("introduction", "aside", "embedded", "correction", "several", "never_stated")


@dataclass(frozen=True)
class HandWrittenItem:
    id: str
    category: str
    slot: str
    value: str | None
    """None for ``never_stated``: the slot is asked, never told."""
    turns: tuple[str, ...]
    question: str

    @property
    def answer(self) -> str:
        """The one right answer (``phrasings.PHRASINGS``' forms, as training answers)."""
        p = PHRASINGS[self.slot]
        return p.unknown if self.value is None else render(p.answer, random.Random(0), self.value)


@dataclass(frozen=True)
class HandWrittenSet:
    items: tuple[HandWrittenItem, ...]
    small_talk: tuple[str, ...]

    def sentences(self) -> list[str]:
        """Every message a user says in the split."""
        return [t for i in self.items for t in (*i.turns, i.question)] + list(self.small_talk)


def _item(raw: Any, where: str) -> HandWrittenItem:
    keys = {"id", "category", "slot", "value", "turns", "question"}
    if not isinstance(raw, dict) or set(raw) != keys:
        raise DataError(f"{where}: an item needs exactly the keys {sorted(keys)}")
    item = HandWrittenItem(
        str(raw["id"]), raw["category"], raw["slot"], raw["value"], tuple(raw["turns"]), raw["question"]
    )
    if item.category not in CATEGORIES or item.slot not in PHRASINGS:
        raise DataError(f"{where} ({item.id}): unknown category {item.category!r} or slot {item.slot!r}")
    if not item.turns or not all(isinstance(t, str) and t.strip() for t in (*item.turns, item.question)):
        raise DataError(f"{where} ({item.id}): turns and question must be non-empty text")
    if (item.value is None) != (item.category == "never_stated"):
        raise DataError(f"{where} ({item.id}): the value is null exactly for never_stated items")
    if item.value is not None and item.value.lower() not in item.turns[-1].lower():
        raise DataError(f"{where} ({item.id}): the value must be said in the last turn")
    return item


def load_hand_written(path: str | Path | None = None) -> HandWrittenSet:
    """The split's items and small talk (default: the file shipped in the package), checked."""
    where = str(path) if path is not None else f"rxruntime.training.data/{DATA_FILE}"
    try:
        text = (
            Path(path).read_text(encoding="utf-8")
            if path is not None
            else resources.files(__package__ or "rxruntime.training.data").joinpath(DATA_FILE).read_text("utf-8")
        )
        raw = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: {exc}") from exc
    items = tuple(_item(r, where) for r in raw.get("items", []))
    small_talk = tuple(str(s) for s in raw.get("small_talk", []))
    if not items or not small_talk or len({i.id for i in items}) != len(items):
        raise DataError(f"{where}: needs items with distinct ids and small talk")
    return HandWrittenSet(items, small_talk)


def hand_written_probes(gaps: Sequence[int], per_gap: int, seed: int) -> dict[int, list[Dialogue]]:
    """Up to ``per_gap`` items for each gap ``k`` (the first ones; all 48 at the default 50), each
    followed by ``k - 1`` small-talk turns drawn from ``seed`` and its question."""
    data = load_hand_written()
    out: dict[int, list[Dialogue]] = {}
    for k in gaps:
        if k < 1:
            raise ValueError(f"need k >= 1, got {k}")
        rng = random.Random(f"rxruntime-hand-written/{seed}/{k}")
        dialogues = []
        for item in data.items[:per_gap]:
            last = len(item.turns) - 1
            said = [Turn(t, "", "fact", item.slot if i == last else None) for i, t in enumerate(item.turns)]
            n = len(data.small_talk)
            chat = [Turn(data.small_talk[j % n], "") for j in rng.sample(range(max(n, k - 1)), k - 1)]
            kind: TurnKind = "unknown" if item.value is None else "question"
            question = Turn(item.question, item.answer, kind, item.slot, item.value, item.category)
            dialogues.append(Dialogue((*said, *chat, question)))
        out[k] = dialogues
    return out
