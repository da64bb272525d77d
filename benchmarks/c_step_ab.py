"""Two versions of the C decode step side by side, through the engine (what `rxrt chat` and `rxrt serve`
run), one after the other in fresh processes on the same machine: `--old` is a decode_step.c from
any commit (`git show REV:models/csrc/decode_step.c > old.c`), the other this checkout's. Each
process loads the model with int8 weights, answers a warm-up turn, then `--turns` turns of
`--answer-tokens` tokens in one conversation (the engine's own AnswerCompleted rates), and times
`--steps` bare decode steps (DecodeBatch on the main thread, no engine) beside them. The order
alternates over `--rounds`; prints each figure and new/old ratios, writes JSON to `--out`.
`--old-env KEY=VALUE` instead makes the old side this checkout's C step run with that variable
set (e.g. `RXRT_INT8_Q4=0`: every matrix q8_0, as before the backbone's Q4_1 matrices were read
in 4 bits).

Issue 24: the default model with its GGUF backbone's matrices in 4 bits, against all q8_0:

    python benchmarks/c_step_ab.py --old-env RXRT_INT8_Q4=0 --rounds 4 \
        --out benchmarks/results/q4-backbone-ab-zen3.json

Issue 23: this measured the step's threads (one OpenMP region per call, decode_step.c's Team)
against the region per product before them:

    git show 0066085:models/csrc/decode_step.c > /tmp/old.c
    python benchmarks/c_step_ab.py --old /tmp/old.c --model ~/.cache/rxruntime/beta-full \\
        --out benchmarks/results/beta-full-size-step-threads-ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def measure(model: str, source: str | None, turns: int, answer_tokens: int, steps: int) -> dict[str, Any]:
    """One side, in this process: the engine's turns, then bare steps on the main thread."""
    import torch
    from reactivex import operators as ops

    import rxruntime
    from rxruntime.events import AnswerCompleted
    from rxruntime.models import DecodeBatch, JoinRequest, SamplingParams, native

    if source:
        native._SOURCE = Path(source)  # the C step this side builds and runs
    start = time.perf_counter()
    engine = rxruntime.load(model, weights="int8")
    out: dict[str, Any] = {"load_s": time.perf_counter() - start, "rates": [], "ttft_s": []}
    vocab = engine.model.config.vocab_size
    query = [10 + (7919 * i) % (vocab - 10) for i in range(64)]
    with engine:
        conv = engine.conversation("ab")
        conv.ask(query[:4], max_new_tokens=2, timeout=3600)
        assert conv.wait_for_memory(3600)
        for _ in range(turns):
            events = conv.interact(query, max_new_tokens=answer_tokens).pipe(ops.to_list()).run()
            done = next(e for e in events if isinstance(e, AnswerCompleted))
            out["rates"].append(done.tokens_per_s)
            out["ttft_s"].append(done.ttft_s)
            assert conv.wait_for_memory(3600)
    model_ = engine.model
    batch = DecodeBatch(model_, 1)
    stm = model_.init_stm(1, torch.Generator().manual_seed(1))[0]
    times = []
    with torch.no_grad():
        batch.join([JoinRequest(0, query, stm, SamplingParams(temperature=0.0), 0)])
        for _ in range(steps):
            t = time.perf_counter()
            batch.step()
            times.append(time.perf_counter() - t)
    out["bare_step_ms"] = 1e3 * statistics.median(times)
    out["engine_tokens_per_s"] = statistics.median(out["rates"])
    out["c_step"] = native.library()._name  # the built library (its name keys the source)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--old", type=Path, help="the other decode_step.c (or --old-env)")
    parser.add_argument("--old-env", help="KEY=VALUE: the old side is this C step with that environment variable")
    parser.add_argument("--model", default="default", help="a model name or directory (rxruntime.load)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1, help="old then new, new then old, ...")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # a child process: measure one side
    args = parser.parse_args()
    if args.side is not None:
        print(json.dumps(measure(args.model, args.side or None, args.turns, args.answer_tokens, args.steps)))
        return
    old_env: dict[str, str] = {}
    if args.old_env is not None:
        key, eq, value = args.old_env.partition("=")
        if not eq or not key:
            parser.error("--old-env takes KEY=VALUE")
        old_env = {key: value}
    elif args.old is None or not args.old.is_file():
        parser.error("--old must name a decode_step.c file (or give --old-env)")
    sides: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            source = str(args.old.resolve()) if name == "old" and not old_env else ""
            env = os.environ | (old_env if name == "old" else {})
            command = [sys.executable, __file__, "--side", source, "--model", args.model, "--turns", str(args.turns)]
            command += ["--answer-tokens", str(args.answer_tokens), "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"the {name} side failed:\n{done.stderr[-4000:]}")
            sides[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            s = sides[name][-1]
            rate, step = s["engine_tokens_per_s"], s["bare_step_ms"]
            print(f"{name}: engine {rate:.1f} tokens/s, bare step {step:.2f} ms", flush=True)
    summary = {
        name: {
            "engine_tokens_per_s": statistics.median(s["engine_tokens_per_s"] for s in runs),
            "bare_step_ms": statistics.median(s["bare_step_ms"] for s in runs),
        }
        for name, runs in sides.items()
    }
    old, new = summary["old"], summary["new"]
    ratios = {
        "engine_tokens_per_s_new_over_old": new["engine_tokens_per_s"] / old["engine_tokens_per_s"],
        "bare_step_old_over_new": old["bare_step_ms"] / new["bare_step_ms"],
    }
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": {"cpu": _cpu_model(), "platform": platform.platform()},
            "settings": vars(args) | {"old": str(args.old), "out": str(args.out)},
            "c_step": sides["new"][0]["c_step"],
            "sides": sides,
            "summary": summary,
            "ratios": ratios,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
