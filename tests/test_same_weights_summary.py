"""benchmarks/rxlm_same_weights.py's batch summary: the ratios over every other side and the two
shares of the compute limit (decode steps alone, and the whole work with the prompts)."""

from __future__ import annotations

import pytest

from benchmarks.rxlm_same_weights import summarize_batches, table


def test_ratios_and_both_shares_of_the_limit() -> None:
    batches = {
        "64": {
            "rxruntime": {"tokens_per_s": 300.0, "wall_s": 2.0},
            "rxruntime-rowwise": {"tokens_per_s": 150.0, "wall_s": 4.0},
            "rxlm-0.3.80": {"tokens_per_s": 100.0, "wall_s": 6.0},
        }
    }
    limit = {
        "limit_tokens_per_s": 1000.0,
        "arithmetic": "float32",
        "peak_flops": {"float32": 1e11},
        "flops_per_token": 1e8,
    }
    summary = summarize_batches(batches, limit, prompt_share=0.5)["64"]
    assert summary["rxlm-0.3.80"]["rxruntime_ratio"] == pytest.approx(3.0)
    assert summary["rxruntime-rowwise"]["rxruntime_ratio"] == pytest.approx(2.0)
    assert "rxruntime_ratio" not in summary["rxruntime"]
    assert summary["rxruntime"]["compute_fraction"] == pytest.approx(0.3)
    assert summary["rxruntime"]["work_fraction"] == pytest.approx(0.6)  # half the tokens read were prompts
    text = table({"summary": {"turns": {}, "batch": {"64": summary}, "compute_limit": limit}, "batch": batches,
                  "config": {"cpu_model": "test CPU"}})  # fmt: skip
    assert "| 64 | rxruntime | 300.0 | 2.00 |  | 30.00% | 60.00% |" in text
    assert "| 64 | rxlm-0.3.80 | 100.0 | 6.00 | 3.00x | 10.00% | 20.00% |" in text
    assert "CPU test CPU" in text
