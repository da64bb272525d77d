"""What each part of the CPU decode fast path buys: variants side by side, interleaved.

Every variant decodes the same conversation (same random weights, prompt and STM) through
``DecodeBatch.step``; repeats cycle through the variants so that load from other processes hits
them alike. Reports the median and best tokens/s of each variant and its ratio to the first one.

    git archive 2e4b729 models | tar -x -C /tmp/before      # the code before the fast path
    python benchmarks/decode_fastpath.py --before /tmp/before/models --repeats 7

Variants (cumulative):

* ``before``: the models package given by ``--before`` (optional);
* ``module path``: today's code with the fast step off (the decoder's modules, ``nn.Linear``
  weight layout, grouped MoE dispatch), greedy sampling without the greedy shortcut;
* ``+ greedy shortcut``: the sampler skips the noise when every row is greedy;
* ``+ fused step``: ``RxTModel._fast_decode_step``, still ``nn.Linear`` layout and grouped MoE;
* ``+ decode layout``: input-major weights, fused Q/K/V (MoE still grouped);
* ``+ gathered MoE``: ``embedding_bag`` expert dispatch = the torch step;
* ``+ C step``: the whole step in C (``models/native.py``) = the default path on a CPU, when a C
  compiler is present.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def _load_before(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "rxt_before", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["rxt_before"] = module
    spec.loader.exec_module(module)
    return module


def _runner(
    pkg: Any, model: Any, prompt: list[int], stm: torch.Tensor, steps: int, **options: Any
) -> Callable[[], float]:
    """A closure that decodes ``steps`` tokens after a fresh join and returns tokens/s."""
    batch = pkg.DecodeBatch(model, 1, **options.pop("batch_kwargs", {}))
    greedy_shortcut = options.pop("greedy_shortcut", True)
    params = pkg.SamplingParams(temperature=0.0)

    def run() -> float:
        batch.join([pkg.JoinRequest("bench", prompt, stm, params, 0)])
        if not greedy_shortcut and hasattr(batch.sampler, "_greedy"):
            batch.sampler._greedy[0] = False
        batch.step().tolist()
        start = time.perf_counter()
        for _ in range(steps):
            batch.step().tolist()
        rate = steps / (time.perf_counter() - start)
        batch.leave("bench")
        return rate

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="alpha-mini")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", type=Path, help="a copy of the models/ package to compare against")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import rxruntime.models as now
    from rxruntime.models import native
    from rxruntime.models.moe import MoE

    torch.manual_seed(0)
    model = now.RxTModel(now.preset(args.preset)).eval()
    gen = torch.Generator().manual_seed(0)
    stm = model.init_stm(1, gen)[0]
    prompt = torch.randint(7, model.config.vocab_size, (35,), generator=gen).tolist()

    plain = copy.deepcopy(model)  # stays in the nn.Linear layout
    for m in (model, plain):
        m.native_decode = False  # the torch step; "+ C step" turns it on
    grouped = copy.deepcopy(model)
    grouped.use_decode_layout()
    for m in grouped.modules():
        if isinstance(m, MoE):
            m.gather_max_tokens = 0  # instance override: always the grouped dispatch
    slow = copy.deepcopy(model)
    slow.fast_decode = False  # the decoder's modules, as before the fast path
    slow_kwargs = {"batch_kwargs": {"decode_layout": False}}

    variants: dict[str, Callable[[], float]] = {}
    if args.before:
        before = _load_before(args.before)
        old = before.RxTModel(before.preset(args.preset)).eval()
        old.load_state_dict(model.state_dict())
        variants["before"] = _runner(before, old, prompt, stm, args.steps)
    variants["module path"] = _runner(now, slow, prompt, stm, args.steps, greedy_shortcut=False, **slow_kwargs)
    variants["+ greedy shortcut"] = _runner(now, slow, prompt, stm, args.steps, **copy.deepcopy(slow_kwargs))
    variants["+ fused step"] = _runner(now, plain, prompt, stm, args.steps, batch_kwargs={"decode_layout": False})
    variants["+ decode layout"] = _runner(now, grouped, prompt, stm, args.steps)
    variants["+ gathered MoE"] = _runner(now, model, prompt, stm, args.steps)
    if native.enabled():
        c_step = copy.deepcopy(model)
        c_step.native_decode = True
        variants["+ C step"] = _runner(now, c_step, prompt, stm, args.steps)
    else:
        print(f"no C step: {native.unavailable_reason()}", file=sys.stderr)

    for run in variants.values():  # warm-up
        run()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, run in variants.items():
            rates[name].append(run())
        loads.append(os.getloadavg()[0])

    first = statistics.median(next(iter(rates.values())))
    print(
        f"{args.preset}, batch 1, greedy, {args.steps} steps x {args.repeats} repeats, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {min(loads):.2f}-{max(loads):.2f}"
    )
    print(f"{'variant':<20} {'median tok/s':>12} {'best tok/s':>11} {'x first':>8}")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name:<20} {med:>12.1f} {max(values):>11.1f} {med / first:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "load": loads, "preset": args.preset}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
