"""benchmarks/engine_phases.py on the small model: every conversation's prompt is counted in a
join, every memory update in an encode and a write, and the wrapped methods are restored."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.engine_phases import main
from rxruntime.models import DecodeBatch, RxTModel


def test_joins_and_memory_updates_are_accounted(tmp_path: Path) -> None:
    join, encode = DecodeBatch.join, RxTModel.encode
    out = tmp_path / "phases.json"
    assert main(["--checkpoint", "small", "--conversations", "3", "--query-tokens", "5", "--answer-tokens", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    (only,) = result["rounds"]
    assert only["summary"]["tokens"] == 9
    assert [j["rows"] for j in only["joins"]] == [3]  # sent in one Engine.together() block: one join
    assert all(j["prompt_tokens"] >= 5 * j["rows"] for j in only["joins"])
    for part in ("encode", "update_memory"):
        assert sum(u["batch"] for u in only["memory"] if u["part"] == part) == 3
    assert DecodeBatch.join is join and RxTModel.encode is encode
