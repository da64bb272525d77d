"""``rxrt bench replay`` at a tiny size: the three paths run and report what each one read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rxruntime.cli import main


def test_bench_replay_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "replay", "--model", "small", "--turns", "3", "--repeats", "1", "--json", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "replay-small.json").read_text()) == result
    turns = result["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert turns[0]["replayed_tokens"] == 0  # nothing before the first turn
    # replay re-reads a growing history; the cached path reads only the query, as on turn 1
    assert 0 < turns[1]["replayed_tokens"] < turns[2]["replayed_tokens"]
    assert all(t["query_tokens"] < t["stateless_prefill_tokens"] for t in turns[1:])
    assert turns[2]["stateless_prefill_tokens"] == turns[2]["replayed_tokens"] + turns[2]["query_tokens"]
    assert result["summary"]["all_answers_identical"] is True
    assert all(t["cached_s"] > 0 and t["replay_s"] > 0 and t["stateless_s"] > 0 for t in turns)
