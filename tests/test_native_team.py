"""The C step's threads (decode_step.c's ``Team``): one OpenMP region per call, whose thread 0 runs
the step and hands each parallel part (a product, the attention heads, the experts) to the others
through a counter they spin on. Each call has its own team, so steps from several Python threads
at once (an engine's decode thread beside another engine's, a benchmark beside a server) give
exactly what each gives alone; teams larger than the work of a part, and than the CPUs, still
compute the step the torch step computes.

Skipped only where there is no C compiler (like the GPU tests without CUDA).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rxruntime.models import DecoderConfig, RxTModel
from rxruntime.models.weight_format import set_weight_format

from .conftest import tiny_model
from .engine_util import decode_steps

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: the C decode step cannot be built"
)

PROMPTS = [list(range(5, 30)), [11, 12], list(range(40, 49))]


def _model(seed: int, weights: str) -> RxTModel:
    model = tiny_model(
        seed=seed, dim=96, stm_size=24, max_seq_len=64,
        decoder=DecoderConfig(
            num_heads=6, self_q_heads=6, self_kv_heads=2, cross_q_heads=3, cross_kv_heads=3, num_experts=6,
            experts_per_token=3, expert_ffn_dim=40,
        ),
    )  # fmt: skip
    set_weight_format(model, weights)  # type: ignore[arg-type]
    return model


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_steps_from_several_threads_at_once_equal_each_alone(weights: str) -> None:
    models = [_model(seed, weights) for seed in (1, 2, 3)]
    alone = [decode_steps(model, PROMPTS, 6) for model in models]
    together: list[list[torch.Tensor]] = [[] for _ in models]
    errors: list[BaseException] = []
    start = threading.Barrier(len(models))

    def run(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):  # long enough for the calls to overlap many times
                together[i] = decode_steps(models[i], PROMPTS, 6)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not errors and not any(w.is_alive() for w in workers)
    for got, expected in zip(together, alone):
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("count", [3, 5, 13])
def test_teams_of_any_size_compute_the_torch_step(threads: None, count: int) -> None:
    """3 and 5 threads split the heads, columns and experts unevenly; 13 is more threads than
    the 6 attention heads of a row, and than this machine's CPUs."""
    torch.set_num_threads(count)
    model = _model(4, "fp32")
    model.native_decode = False
    reference = decode_steps(model, PROMPTS, 5)
    model.native_decode = True
    got = decode_steps(model, PROMPTS, 5)
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_int8_steps_are_the_same_bits_at_any_thread_count(threads: None) -> None:
    """An int8 matrix is stored tile by tile (16 columns, all their blocks together), so every
    product splits it by columns: each column's sum is one thread's, in one order, whatever the
    team's size. Split by rows (as float32's narrow matrices are), the threads' partial sums made
    a column's bits depend on how many threads there were."""
    model = _model(5, "int8")
    steps = 5
    results = []
    for count in (1, 2, 3):
        torch.set_num_threads(count)
        results.append(decode_steps(model, PROMPTS, steps)[:steps])  # the steps' logits (not the prefill's cache)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results[0]))


def test_the_side_by_side_script_runs(tmp_path: Path) -> None:
    """``benchmarks/c_step_ab.py`` (docs/benchmarks.md section 9) at a tiny size: a C step
    from another file beside this checkout's, both through the engine, each in its own process."""
    root = Path(__file__).parents[1]
    old = tmp_path / "old.c"
    shutil.copy(root / "models" / "csrc" / "decode_step.c", old)
    old.write_text(old.read_text() + "\n/* another version */\n")  # another source: its own build
    out = tmp_path / "ab.json"
    args = ["--old", str(old), "--model", "small", "--turns", "1", "--answer-tokens", "4", "--steps", "2"]
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "c_step_ab.py"), *args, "--out", str(out)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert [len(result["sides"][side]) for side in ("old", "new")] == [1, 1]
    assert result["sides"]["old"][0]["c_step"] != result["sides"]["new"][0]["c_step"]  # two builds ran
    assert all(v > 0 for v in result["ratios"].values())
    assert result["settings"]["model"] == "small" and result["machine"]["cpu"]
