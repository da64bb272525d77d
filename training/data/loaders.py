"""Loading training data from local files: JSONL, or anything Hugging Face ``datasets`` reads.

One record is one of three shapes (the first that fits wins):

* ``{"turns": [{"query": ..., "answer": ...}, ...]}``: a multi-turn dialogue (stages 3-4),
* ``{"query": ..., "answer": ...}``: a single interaction (a one-turn dialogue),
* ``{"text": ...}``: plain text (stage 1 only).

Field names are configurable (``query_field`` and friends), so a local copy of a public dataset
can be used without rewriting it. ``datasets`` is an optional dependency (``pip install
'rxruntime[train]'``); JSONL needs nothing. No loader ever touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rxruntime.models.errors import RxTError

from .dialogues import Dialogue, Turn


class DataError(RxTError, ValueError):
    """A data file is missing, malformed, or has records of no known shape."""


@dataclass(frozen=True)
class Fields:
    """Which record fields hold the dialogue turns, the query, the answer and plain text."""

    turns: str = "turns"
    query: str = "query"
    answer: str = "answer"
    text: str = "text"


@dataclass
class Corpus:
    """What a data source provides: dialogues (possibly one-turn) and plain texts."""

    dialogues: list[Dialogue]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.dialogues) + len(self.texts)


def parse_records(records: Iterable[Mapping[str, Any]], fields: Fields = Fields(), source: str = "data") -> Corpus:
    """Sort records into dialogues and texts, rejecting any record of no known shape by its index."""
    dialogues: list[Dialogue] = []
    texts: list[str] = []
    for i, record in enumerate(records):
        where = f"{source}: record {i}"
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}")
        if fields.turns in record:
            turns = record[fields.turns]
            if not isinstance(turns, list) or not turns:
                raise DataError(f"{where}: {fields.turns!r} must be a non-empty list of turns")
            dialogues.append(Dialogue(tuple(_turn(t, fields, f"{where} turn {j}") for j, t in enumerate(turns))))
        elif fields.query in record or fields.answer in record:
            dialogues.append(Dialogue((_turn(record, fields, where),)))
        elif fields.text in record:
            text = record[fields.text]
            if not isinstance(text, str):
                raise DataError(f"{where}: {fields.text!r} must be a string")
            texts.append(text)
        else:
            raise DataError(
                f"{where}: no {fields.turns!r}, {fields.query!r}/{fields.answer!r} or {fields.text!r} field "
                f"(found {sorted(record)})"
            )
    return Corpus(dialogues, texts)


def _turn(record: Any, fields: Fields, where: str) -> Turn:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object with {fields.query!r} and {fields.answer!r}")
    query, answer = record.get(fields.query), record.get(fields.answer)
    if not isinstance(query, str) or not isinstance(answer, str):
        raise DataError(f"{where}: {fields.query!r} and {fields.answer!r} must both be strings")
    return Turn(query, answer)


def load_jsonl(path: str | Path, fields: Fields = Fields()) -> Corpus:
    """One JSON object per line; blank lines are skipped; a bad line is reported by number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such JSONL file")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
    return parse_records(records, fields, str(path))


def load_hf_local(path: str | Path, split: str = "train", fields: Fields = Fields()) -> Corpus:
    """A local Hugging Face dataset: a ``save_to_disk`` folder, or data files (json/jsonl/csv/parquet).

    Never downloads: a path that does not exist is an error, not a Hub id.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such local dataset (the Hub is not used for training data)")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading Hugging Face datasets needs the optional 'datasets' package "
            "(pip install 'rxruntime[train]'); JSONL files work without it"
        ) from None
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    else:
        suffix = path.suffix.lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(suffix)
        if builder is None:
            raise DataError(f"{path}: expected a save_to_disk folder or a .jsonl/.json/.csv/.parquet file")
        loaded = datasets.load_dataset(builder, data_files=str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    return parse_records(loaded, fields, str(path))
