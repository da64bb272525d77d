"""The C decode step with float32, bf16 and int8 weights, side by side in one process.

Each format decodes the same greedy conversation (same random alpha-mini weights before rounding,
same prompt and STM) through ``DecodeBatch.step``; the repeats cycle through the formats so load
from other processes hits them alike. Reported per format: wall-clock tokens/s (median, best) and
tokens per CPU-second of the process (``time.process_time``: on a loaded machine a descheduled
thread costs wall time but no CPU time, so this one says more about the code when others run).

    python benchmarks/quant_decode.py --preset alpha-mini --threads 2 --repeats 7 \\
        --out benchmarks/results/quant-decode-alpha-mini.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rxruntime.models import DecodeBatch, JoinRequest, RxTModel, SamplingParams, native, preset
from rxruntime.models.quantize import WEIGHT_FORMATS, WeightFormat
from rxruntime.models.weight_format import set_weight_format


def _run(model: RxTModel, steps: int, prompt: list[int]) -> tuple[float, float]:
    """Wall and CPU seconds of ``steps`` greedy decode steps after a one-row prefill."""
    stm = model.init_stm(1, torch.Generator().manual_seed(1))
    batch = DecodeBatch(model, 1)
    batch.join([JoinRequest("b", prompt, stm[0], SamplingParams(temperature=0.0), 0)])
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        batch.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="alpha-mini")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--formats", default=",".join(WEIGHT_FORMATS))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = RxTModel(preset(args.preset)).eval()
    formats: list[WeightFormat] = [f for f in WEIGHT_FORMATS if f in args.formats.split(",")]
    models: dict[str, RxTModel] = {}
    for fmt in formats:
        models[fmt] = copy.deepcopy(base)
        set_weight_format(models[fmt], fmt)
    prompt = list(range(7, 7 + 35))
    for model in models.values():
        _run(model, 4, prompt)  # warm-up: binding, quantised copies, first-call allocations
    wall: dict[str, list[float]] = {f: [] for f in models}
    cpu: dict[str, list[float]] = {f: [] for f in models}
    load_start = os.getloadavg()
    for r in range(args.repeats):
        for fmt, model in models.items():
            w, c = _run(model, args.steps, prompt)
            wall[fmt].append(args.steps / w)
            cpu[fmt].append(args.steps / c)
            print(f"repeat {r + 1}: {fmt} {args.steps / w:.1f} tok/s ({args.steps / c:.1f} per CPU-s)", flush=True)
    result: dict[str, Any] = {
        "config": {
            "preset": args.preset,
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "repeats": args.repeats,
            "isa": native.isa(),
            "native": native.unavailable_reason() or "available",
            "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg()),
            "cpu_count": os.cpu_count(),
        },
        "formats": {
            f: {
                "tokens_per_s": statistics.median(wall[f]),
                "best_tokens_per_s": max(wall[f]),
                "tokens_per_cpu_s": statistics.median(cpu[f]),
                "runs": wall[f],
                "runs_per_cpu_s": cpu[f],
            }
            for f in models
        },
    }
    base_rate = result["formats"][formats[0]]["tokens_per_s"]
    base_cpu = result["formats"][formats[0]]["tokens_per_cpu_s"]
    load_end = os.getloadavg()[0]
    print(f"{args.preset}, {args.threads} threads, {native.isa()}, load {load_start[0]:.1f} -> {load_end:.1f}")
    for f, row in result["formats"].items():
        print(
            f"{f:>5}: median {row['tokens_per_s']:7.1f} tok/s (best {row['best_tokens_per_s']:.1f}, "
            f"{row['tokens_per_s'] / base_rate:.2f}x), {row['tokens_per_cpu_s']:.1f} tok per CPU-s "
            f"({row['tokens_per_cpu_s'] / base_cpu:.2f}x)"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
