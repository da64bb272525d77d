"""What another thread's OpenMP team costs torch work on a thread, and what handing it back buys.

Runs one workload (``--ops`` small element-wise ops, each over the parallel grain; with
``--checkpoint``, also one ``--prompts``-prompt prefill through ``DecodeBatch.join``) three ways,
side by side in one process, best of ``--repeats``:

* ``main``: on the main thread, the only thread with an OpenMP team;
* ``thread``: on a fresh thread while the main thread keeps its team (what an engine's decode and
  memory threads saw before ``models/openmp.py``);
* ``thread, main released``: the same after ``openmp.release_idle_threads()`` on the main thread.

::

    python benchmarks/openmp_threads.py --checkpoint /tmp/am-rxlm --prompts 16
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rxruntime.bench.overlap import cpu_model
from rxruntime.models import openmp


def elementwise(ops: int) -> Callable[[], None]:
    x = torch.randn(512, 512)

    def run() -> None:
        for _ in range(ops):
            (x * 2.0).relu_()

    return run


def prefill(checkpoint: str, prompts: int) -> Callable[[], None]:
    from rxruntime.bench.decode import apply_weights
    from rxruntime.models import DecodeBatch, JoinRequest, SamplingParams
    from rxruntime.models.checkpoint import load_pretrained

    model, _ = load_pretrained(checkpoint, device="cpu", dtype=torch.float32)
    apply_weights(model, "fp32")
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(7, model.config.vocab_size, (35,), generator=g).tolist() for _ in range(prompts)]
    stm = model.init_stm(prompts, generator=g)
    greedy = SamplingParams(temperature=0.0)

    def run() -> None:
        batch = DecodeBatch(model, capacity=prompts)
        batch.join([JoinRequest(i, q, stm[i], greedy, 0) for i, q in enumerate(queries)])

    return run


def best(fn: Callable[[], None], repeats: int, threads: int) -> float:
    """Best wall time of ``fn`` over ``repeats`` calls, each on the calling thread."""
    torch.set_num_threads(threads)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def on_thread(fn: Callable[[], None], repeats: int, threads: int) -> float:
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(best(fn, repeats, threads)))
    t.start()
    t.join()
    return out[0]


def measure(fn: Callable[[], None], repeats: int, threads: int) -> dict[str, float]:
    main = best(fn, repeats, threads)  # leaves the main thread's team in place
    thread = on_thread(fn, repeats, threads)
    released = openmp.release_idle_threads()
    after = on_thread(fn, repeats, threads)
    return {"main_s": main, "thread_s": thread, "thread_main_released_s": after, "released": released}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--checkpoint", help="a model directory: also time a float32 prefill")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    workloads = {f"{args.ops} element-wise ops": elementwise(args.ops)}
    if args.checkpoint:
        workloads[f"{args.prompts}-prompt float32 prefill"] = prefill(args.checkpoint, args.prompts)
    results: dict[str, Any] = {}
    for name, fn in workloads.items():
        fn()  # warm-up on the main thread
        r = measure(fn, args.repeats, args.threads)
        results[name] = r
        print(
            f"{name}: main {r['main_s']:.3f} s, thread {r['thread_s']:.3f} s "
            f"({r['thread_s'] / r['main_s']:.2f}x main), thread after release {r['thread_main_released_s']:.3f} s "
            f"({r['thread_main_released_s'] / r['main_s']:.2f}x main)"
        )
    report = {"config": {**vars(args), "out": str(args.out) if args.out else None, "cpu_model": cpu_model(),
                         "openmp_runtime": str(openmp.runtime_path())}, "results": results}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
