"""``rxrt bench``: the output's shape and sanity, at a size CI runs in seconds. No timing asserts:
the numbers depend on the machine and its load."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from rxruntime.cli import main
from rxruntime.models import RxTModel, preset


def test_bench_turns_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "turns", "--preset", "nano", "--turns", "3", "--json", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"rxt", "baseline", "config"}
    assert [r["turn"] for r in result["rxt"]] == [1, 2, 3]
    assert [r["turn"] for r in result["baseline"]] == [1, 2, 3]
    for record in result["rxt"]:
        assert set(record) == {"turn", "ttft_s", "turn_s", "tokens_per_s", "memory_update_s"}
        assert all(record[k] > 0 for k in ("ttft_s", "turn_s", "tokens_per_s", "memory_update_s"))
        assert record["ttft_s"] <= record["turn_s"]
    for record in result["baseline"]:
        assert set(record) == {"turn", "ttft_s", "turn_s", "tokens_per_s"}
        assert all(record[k] > 0 for k in ("ttft_s", "turn_s", "tokens_per_s"))
    cfg = result["config"]
    assert cfg["preset"] == "nano" and cfg["turns"] == 3 and cfg["dtype"] == "float32"
    assert result["summary"]["turn_ratio"] > 0
    assert json.loads((tmp_path / "turns-nano.json").read_text())["config"]["turns"] == 3
    assert (tmp_path / "turns-nano.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_turns_table_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rxlm": [{"turn": 1, "ttft_s": 0.1, "turn_s": 1.0, "tokens_per_s": 60.0}]}))
    argv = ["bench", "turns", "--preset", "nano", "--turns", "1", "--answer-tokens", "4", "--out", str(tmp_path)]
    assert main([*argv, "--compare", f"RxLM={other}"]) == 0
    out = capsys.readouterr().out
    assert "baseline / RxT turn" in out.replace("\n", " ") or "baseline" in out
    assert (tmp_path / "turns-nano.png").exists()


def test_bench_turns_weight_formats_each_a_series(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "turns", "--preset", "nano", "--turns", "2", "--answer-tokens", "4", "--json"]
    assert main([*argv, "--weights", "fp32,int8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["series"] == {
        "rxt": "RxT fp32",
        "rxt_int8": "RxT int8",
        "baseline": "baseline: transformers, history re-read",
    }
    assert [r["turn"] for r in result["rxt_int8"]] == [1, 2]
    assert all(r["memory_update_s"] > 0 for r in result["rxt_int8"])
    assert result["config"]["weights"] == ["fp32", "int8"] and result["config"]["baseline"] == "transformers"
    s = result["summary"]
    assert set(s["systems"]) == {"rxt", "rxt_int8", "baseline"}
    assert s["systems"]["rxt"]["over_rxt"]["total"] == pytest.approx(1.0)
    assert s["systems"]["baseline"]["total_s"] == pytest.approx(s["baseline_total_s"])
    assert {(c["rxt"], c["other"]) for c in s["comparisons"]} == {("rxt", "baseline"), ("rxt_int8", "baseline")}
    assert result["memory"]["rxt_stm_bytes"] == 4 * 4 * preset("nano").stm_size * 128  # layers x slots x dim x fp32


def test_bench_turns_bad_options(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bench", "turns", "--preset", "nano", "--turns", "1"]
    assert main([*base, "--weights", "fp16"]) == 2
    assert main([*base, "--weights", "int8,int8"]) == 2
    assert main([*base, "--baseline", "llamacpp", "--llamacpp-types", "q4_0"]) == 2
    capsys.readouterr()
    # Without llama-cpp-python: a typed error naming the extra, before any model is built.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    assert main([*base, "--baseline", "llamacpp"]) == 2
    assert "pip install 'rxruntime[llamacpp]'" in capsys.readouterr().err
    from rxruntime.bench import TurnsConfig, run_turns
    from rxruntime.bench.llamacpp_runtime import LlamaCppUnavailableError

    with pytest.raises(LlamaCppUnavailableError, match=r"rxruntime\[llamacpp\]"):
        run_turns(TurnsConfig(preset="nano", turns=1, baseline="llamacpp"))


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python not installed: it compiles llama.cpp, so CI leaves it out "
    "(run by hand after pip install 'rxruntime[llamacpp]')",
)
def test_bench_turns_llamacpp_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "turns", "--preset", "nano", "--turns", "2", "--query-tokens", "8", "--answer-tokens", "4"]
    assert main([*argv, "--baseline", "llamacpp", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    peers = [f"llamacpp_{t}_{m}" for t in ("f32", "q8_0") for m in ("cached", "reread")]
    assert list(result["series"]) == ["rxt", "baseline", *peers]
    assert result["failures"] == {}  # every llama.cpp child ran to the end
    for key in peers:
        assert [r["turn"] for r in result[key]] == [1, 2]
        for record in result[key]:
            assert set(record) == {"turn", "ttft_s", "turn_s", "tokens_per_s"}
            assert 0 < record["ttft_s"] <= record["turn_s"]
    cfg = result["config"]
    assert cfg["llamacpp_types"] == ["f32", "q8_0"] and cfg["llamacpp_n_ctx"] == 2 * (11 + 4 + 1) + 64
    assert cfg["llamacpp_tensor_bytes"]["q8_0"] < cfg["llamacpp_tensor_bytes"]["f32"] / 3
    kv = result["memory"]["llamacpp_kv_at_last_turn"]
    assert set(kv) == {"llamacpp_f32_cached", "llamacpp_q8_0_cached"}
    assert all(v["cached_tokens"] == 2 * 16 - 2 and v["state_bytes"] > 0 for v in kv.values())
    assert len(result["summary"]["comparisons"]) == 5
    assert (tmp_path / "turns-nano.png").read_bytes()[:4] == b"\x89PNG"


def test_turns_findings_say_where_rxt_is_behind() -> None:
    from rxruntime.bench.turns_report import describe, summarize, turn_ranges

    def recs(turns: list[float], ttft: float) -> list[dict[str, float]]:
        return [
            {"turn": i, "ttft_s": ttft, "turn_s": t, "tokens_per_s": 100.0, "memory_update_s": 0.01}
            for i, t in enumerate(turns, start=1)
        ]

    result: dict[str, object] = {
        "series": {"rxt": "RxT fp32", "baseline": "baseline", "peer": "fast peer"},
        "rxt": recs([0.2, 0.2, 0.2, 0.2], 0.05),
        "baseline": recs([0.3, 0.4, 0.5, 0.6], 0.06),
        "peer": recs([0.1, 0.15, 0.25, 0.3], 0.02),
    }
    s = summarize(result)
    assert s["turn_ratio"] == pytest.approx(3.0) and s["rxt_total_s"] == pytest.approx(0.8)
    by_other = {c["other"]: c for c in s["comparisons"]}
    assert by_other["baseline"]["rxt_behind"] is False and by_other["baseline"]["rxt_behind_turns"] == []
    peer = by_other["peer"]
    assert peer["rxt_behind_turns"] == [1, 2] and peer["rxt_behind_ttft_turns"] == [1, 2, 3, 4]
    assert peer["rxt_behind_total"] is False  # 0.8 s against 0.8 s: not behind
    assert "BEHIND at turns 1-2" in peer["sentence"] and "ahead at turns 3-4" in peer["sentence"]
    assert s["rxt_behind"] == [peer["sentence"]]
    assert s["systems"]["peer"]["over_rxt"]["turn_1"] == pytest.approx(0.5)
    result["summary"] = s
    assert any("fast peer: 4 turns 0.80 s" in line for line in describe(result))
    assert turn_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10" and turn_ranges([]) == ""


def test_bench_decode_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "decode", "--preset", "nano", "--steps", "4", "--repeats", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_per_s"] > 0 and len(result["runs"]) == 2 and result["steps"] == 4
    compared = result["steps_compared"]
    assert compared["torch"]["tokens_per_s"] > 0 and len(compared["torch"]["runs"]) == 2
    # The C step is compared whenever it builds here, and is then the default.
    assert ("C" in compared) == (result["native"] == "available")
    assert result["step"] == ("C" if "C" in compared else "torch")
    assert result["runs"] == compared[result["step"]]["runs"]
    assert (
        main(["bench", "decode", "--preset", "nano", "--steps", "2", "--repeats", "1", "--batch-size", "3", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["batch_size"] == 3
    assert main(["bench", "decode", "--preset", "nano", "--repeats", "0"]) == 2


def test_query_and_answer_must_fit_the_interaction() -> None:
    assert main(["bench", "turns", "--preset", "nano", "--turns", "1", "--answer-tokens", "200"]) == 2


@pytest.mark.parametrize("name", ["nano", "alpha-mini"])
def test_baseline_matches_the_active_parameter_count(name: str) -> None:
    from transformers import LlamaForCausalLM

    from rxruntime.bench.turns import active_parameters, baseline_config

    with torch.device("meta"):
        model = RxTModel(preset(name))
        llama = LlamaForCausalLM(baseline_config(model, 512))
    target = model.active_parameter_count()
    got = active_parameters(llama, model.config.vocab_size, model.config.dim)
    assert abs(got - target) / target < 1e-3
    assert llama.config.num_hidden_layers == model.config.num_layers


# ---------------------------------------------------------------------- overlap and throughput
def _rxrt_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("rxrt")}


def test_bench_overlap_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _rxrt_threads()
    argv = ["bench", "overlap", "--preset", "nano", "--turns", "3", "--query-tokens", "8", "--answer-tokens", "6"]
    assert main([*argv, "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"immediate", "after_memory", "summary", "config"}
    for mode in ("immediate", "after_memory"):
        records = result[mode]
        assert [r["turn"] for r in records] == [1, 2, 3]
        for r in records:
            assert set(r) == {"turn", "ttft_s", "turn_s", "queued_s", "memory_update_s", "ready_s", "tokens"}
            assert r["tokens"] == 6  # [EOS] is unreachable: every answer runs to the length asked
            assert r["ttft_s"] > 0 and r["memory_update_s"] > 0 and r["queued_s"] >= 0
            # event order, not speed: first token, then the answer, then the memory commit
            assert r["ttft_s"] <= r["turn_s"] <= r["ready_s"]
    s = result["summary"]
    assert s["turns_in_medians"] == "2..3"
    for mode in ("immediate", "after_memory"):
        assert set(s[mode]) == {"ttft_s", "turn_s", "queued_s", "memory_update_s", "ready_s"}
        assert s["conversation_s"][mode] > 0
    assert s["ttft_ratio"] > 0 and s["turn_ratio"] > 0 and s["exposed_fraction"] >= 0
    assert s["synchronous_turn_s"] == pytest.approx(s["after_memory"]["turn_s"] + s["after_memory"]["memory_update_s"])
    cfg = result["config"]
    assert cfg["preset"] == "nano" and cfg["turns"] == 3 and cfg["answer_tokens"] == 6
    assert {"machine", "torch", "threads", "load_average_start", "load_average_end", "dtype"} <= set(cfg)
    assert json.loads((tmp_path / "overlap-nano.json").read_text())["config"]["turns"] == 3
    assert _rxrt_threads() <= before  # the engine's threads are gone


def test_bench_overlap_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "overlap", "--preset", "nano", "--turns", "2", "--query-tokens", "4", "--answer-tokens", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "immediate" in out and "after_memory" in out and "TTFT" in out


def test_bench_throughput_json_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rxruntime.models import DecodeBatch

    joins: list[int] = []
    real_join = DecodeBatch.join

    def join(self: DecodeBatch, requests: Any) -> Any:
        joins.append(len(requests))
        return real_join(self, requests)

    monkeypatch.setattr(DecodeBatch, "join", join)
    before = _rxrt_threads()
    argv = ["bench", "throughput", "--preset", "nano", "--concurrency", "1,3", "--query-tokens", "8"]
    assert main([*argv, "--answer-tokens", "5", "--json", "--out", str(tmp_path)]) == 0
    assert joins == [1, 1, 3]  # the warm-up, then each level's queries sent together: one join each
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"results", "config", "compute_limit"}
    assert [r["conversations"] for r in result["results"]] == [1, 3]
    limit = result["compute_limit"]
    assert limit["arithmetic"] in ("int8", "float32") and limit["peak_flops"]["float32"] > 0
    assert limit["context_tokens"] == 8 + 3 + 5 / 2
    assert limit["limit_tokens_per_s"] == pytest.approx(
        limit["peak_flops"][limit["arithmetic"]] / limit["flops_per_token"]
    )
    for r in result["results"]:
        n = r["conversations"]
        assert r["tokens"] == 5 * n and r["max_batch"] == 3 and r["limited"] is False
        for key in ("tokens_per_s", "token_latency_p50_s", "token_latency_p95_s", "ttft_p50_s", "ttft_p95_s"):
            assert r[key] > 0, key
        assert r["wall_s"] > 0 and r["memory_update_p50_s"] > 0 and r["send_spread_s"] >= 0
        assert r["token_latency_p50_s"] <= r["token_latency_p95_s"] and r["ttft_p50_s"] <= r["ttft_p95_s"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert r["compute_fraction"] == pytest.approx(r["tokens_per_s"] / limit["limit_tokens_per_s"])
        assert r["compute_fraction_fp32"] == pytest.approx(r["tokens_per_s"] / limit["limit_tokens_per_s_fp32"])
    cfg = result["config"]
    assert cfg["concurrency"] == [1, 3] and cfg["max_batch"] == 3 and cfg["decode_row_bytes"] > 0
    assert cfg["apart"] is False
    assert {"machine", "torch", "threads", "load_average_start", "load_average_end"} <= set(cfg)
    assert json.loads((tmp_path / "throughput-nano.json").read_text())["config"]["concurrency"] == [1, 3]
    assert _rxrt_threads() <= before


def test_bench_throughput_beyond_max_batch_queues(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "throughput", "--preset", "nano", "--concurrency", "3", "--max-batch", "2", "--no-warmup"]
    assert main([*argv, "--query-tokens", "4", "--answer-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "queued" in out and "max batch 2" in out
    assert "compute limit: " in out and ("(int8 matrix products" in out or "(float32 matrix products" in out)
    assert main([*argv, "--query-tokens", "4", "--answer-tokens", "3", "--json", "--no-compute-limit"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compute_limit"] is None and "compute_fraction" not in result["results"][0]


def test_decode_flops_per_token_counts_parameters_and_attention() -> None:
    from rxruntime.bench.throughput import decode_flops_per_token

    model = RxTModel(preset("alpha-mini"))
    cfg, d = model.config, model.config.decoder
    head_dim = cfg.dim // d.num_heads
    at_0 = decode_flops_per_token(model, 0)
    assert at_0 == 2 * model.active_parameter_count() + 4 * head_dim * d.cross_q_heads * cfg.stm_size * cfg.num_layers
    per_context_token = 4 * head_dim * d.self_q_heads * cfg.num_layers
    assert decode_flops_per_token(model, 100) - at_0 == pytest.approx(100 * per_context_token)
    assert 55e6 < at_0 < 80e6  # alpha-mini: 29.6M active parameters, plus reading a 256-slot STM


def test_percentile_interpolates_like_numpy() -> None:
    from rxruntime.bench.throughput import percentile

    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([float(i) for i in range(101)], 95) == pytest.approx(95.0)


def test_bad_throughput_arguments() -> None:
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--concurrency", "0,8"])
    assert main(["bench", "throughput", "--preset", "nano", "--answer-tokens", "200"]) == 2
    assert main(["bench", "overlap", "--preset", "nano", "--turns", "0"]) == 2
