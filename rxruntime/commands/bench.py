"""``rxrt bench``: performance benchmarks (see docs/benchmarks.md).

* ``rxrt bench decode``: generated tokens/s through the decode batch (``decode_step`` + sampler).
* ``rxrt bench turns``: one N-turn conversation, RxT against a stateless Llama baseline of the
  same active size (needs the ``bench`` extra: transformers, matplotlib); ``--baseline llamacpp``
  also runs that Llama in llama.cpp (the ``llamacpp`` extra), ``--weights`` RxT's weight formats.
* ``rxrt bench overlap``: through the engine, the next query sent the moment the answer completes
  (behind the memory update) against sent after the update: what the asynchronous update hides.
* ``rxrt bench throughput``: N conversations at once on one engine, for several N: aggregate
  tokens/s, per-token latency, TTFT and memory-update time.
* ``rxrt bench replay``: a stateless client through ``/v1/chat/completions``: the history's STM
  from the cache, rebuilt by replay, or a stateless model re-reading it (needs the ``http`` extra).

``turns``, ``decode``, ``overlap`` and ``throughput`` run the engine's own default weights for
the device (``--weights default``: int8 where the C step runs a float32 CPU model, else fp32),
what ``rxrt chat`` and ``serve`` run, and every report names the weights and the decode step it
measured. ``turns`` and ``throughput`` take ``--dtype`` for CUDA (``default``: bfloat16 there, as
``rxruntime.load``; float32 on the CPU, which refuses the others).
``overlap`` and ``throughput`` print a table, or JSON with ``--json``; ``--out DIR`` also writes
``<name>-<preset>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rxruntime.commands import add_model_options


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmarks: decode tokens/s, multi-turn RxT vs a baseline, memory overlap, throughput"
    )
    sub = p.add_subparsers(dest="bench", required=True)

    d = sub.add_parser("decode", help="generated tokens/s through DecodeBatch.step")
    _common(d)
    d.add_argument("--steps", type=int, default=64, help="timed decode steps per repeat")
    d.add_argument("--repeats", type=int, default=5, help="the median of this many runs is reported")
    d.add_argument("--batch-size", type=int, default=1, help="conversations decoded together")
    d.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--compile", action="store_true", help="torch.compile the decode step first (~2 min)")
    _weights(d)
    d.set_defaults(func=run_decode)

    t = sub.add_parser("turns", help="one N-turn conversation: RxT vs a stateless Llama of the same active size")
    _common(t)
    t.add_argument("--turns", type=int, default=20)
    t.add_argument("--query-tokens", type=int, default=32)
    t.add_argument("--answer-tokens", type=int, default=64, help="forced answer length (EOS ignored)")
    t.add_argument("--repeats", type=int, default=1, help="run the conversation this many times; per-turn medians")
    t.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default) for both models")
    t.add_argument("--compile", action="store_true", help="torch.compile RxT's decode step first (about two minutes)")
    t.add_argument(
        "--weights",
        type=_names,
        default=["default"],
        help="RxT weight formats, comma-separated, one series each: fp32, bf16, int8, default (the "
        "engine's own for the device: int8 where the C step runs the model on a CPU, else fp32; the default), "
        "or int8-rowwise (int8 through the C step's row-by-row kernels, as before the multi-row kernel)",
    )
    _dtype(t)
    t.add_argument(
        "--baseline",
        choices=["transformers", "llamacpp"],
        default="transformers",
        help="llamacpp: also run the baseline Llama in llama.cpp (GGUF), prompt cache kept and history re-read "
        "(needs the llamacpp extra)",
    )
    t.add_argument(
        "--llamacpp-types",
        type=_names,
        default=["f32", "q8_0"],
        help="GGUF weight types for --baseline llamacpp: f32, q8_0 (default both)",
    )
    t.add_argument(
        "--llamacpp-timeout",
        type=float,
        default=300.0,
        help="seconds one command to a llama.cpp child process (load, one turn) may take before that series "
        "is reported as timed out (default 300)",
    )
    t.add_argument("--out", type=Path, help="directory for turns-<preset>.json and turns-<preset>.png")
    t.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=FILE",
        help="add another system's per-turn JSON (a list of records, or {key: [records]}) to the plot",
    )
    t.set_defaults(func=run_turns)

    o = sub.add_parser("overlap", help="next query at once (behind the memory update) vs after it, via the engine")
    _common(o)
    o.add_argument("--turns", type=int, default=10)
    o.add_argument("--query-tokens", type=int, default=32)
    o.add_argument("--answer-tokens", type=int, default=64, help="forced answer length ([EOS] made unreachable)")
    _weights(o)
    o.add_argument("--out", type=Path, help="directory for overlap-<preset>.json")
    o.set_defaults(func=run_overlap)

    h = sub.add_parser("throughput", help="N concurrent conversations on one engine: tokens/s, latency, TTFT")
    _common(h)
    h.add_argument(
        "--concurrency", type=_levels, default=[1, 8, 64, 256], help="comma-separated conversation counts (1,8,64,256)"
    )
    h.add_argument("--query-tokens", type=int, default=32)
    h.add_argument("--answer-tokens", type=int, default=32, help="forced answer length ([EOS] made unreachable)")
    h.add_argument(
        "--max-batch", type=int, help="decode rows of the engine (default: the largest concurrency, if memory allows)"
    )
    h.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up round")
    h.add_argument(
        "--apart",
        action="store_true",
        help="send each level's queries as independent clients (default: in one Engine.together() block, one prefill)",
    )
    h.add_argument(
        "--no-compute-limit", action="store_true", help="skip measuring the machine's matrix-product rate (~1 s)"
    )
    _weights(h)
    _dtype(h)
    h.add_argument("--out", type=Path, help="directory for throughput-<preset>.json")
    h.set_defaults(func=run_throughput)

    r = sub.add_parser(
        "replay", help="Chat Completions through the HTTP front: cached STM vs replayed history vs a stateless model"
    )
    r.add_argument("--model", default="default", help="model directory, hub id, or 'default' (the embedded model)")
    add_model_options(r)
    r.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--seed", type=int, default=0, help="of the stateless model's random weights")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.add_argument("--turns", type=int, default=20)
    r.add_argument("--repeats", type=int, default=3, help="per-turn medians over this many conversations")
    r.add_argument("--out", type=Path, help="directory for replay-<model>.json")
    r.set_defaults(func=run_replay)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="alpha-mini", help="model size: alpha-mini, micro, nano (random weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _weights(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        default="default",
        help="weight format: fp32, bf16, int8, default (the engine's own for the device: int8 where the "
        "C step runs the model on a CPU, else fp32; the default), or int8-rowwise (int8 through the C step's "
        "row-by-row kernels, as before the multi-row kernel)",
    )


def _dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="default",
        help="what the model computes in on CUDA: float32, bfloat16, float16, or default (the engine's own: "
        "bfloat16 on CUDA, float32 on the CPU, which takes float32 only; its compact weights are --weights)",
    )


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def run_decode(args: argparse.Namespace) -> int:
    import statistics
    import time

    import torch

    from rxruntime.bench import measure_decode
    from rxruntime.bench.decode import apply_weights, weights_line
    from rxruntime.models import DecodeBatch, RxTModel, SamplingParams, native, preset
    from rxruntime.models.errors import RxTError

    if min(args.steps, args.repeats, args.batch_size) < 1:
        raise RxTError("--steps, --repeats and --batch-size must be at least 1")
    _threads(args)
    torch.manual_seed(args.seed)
    model = RxTModel(preset(args.preset)).to(args.device).eval()
    weights = apply_weights(model, args.weights)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    batch = DecodeBatch(model, args.batch_size)
    # The decode steps side by side, repeats interleaved: "torch" is the eager torch step, "C" the
    # C step of models/native.py (the default on a CPU when it builds), "compiled" the opt-in
    # torch.compile'd step. The last one listed is what the runtime uses with these options.
    # With int8 or float32 weights and the multi-row kernels, "C row by row" is the C step before
    # them (one activation row per pass), side by side.
    kernels: dict[str, tuple[bool, Any]] = {"torch": (False, None)}
    c_step = model.device.type == "cpu" and args.batch_size <= native.max_rows(model) and native.enabled()
    per_pass = native.rows_per_pass(model)
    if c_step and weights in ("int8", "fp32") and per_pass > 1 and args.batch_size <= native.MAX_ROWS:
        kernels["C row by row"] = (True, None)
    if c_step:
        kernels["C"] = (True, None)
    compile_s = None
    if args.compile:
        model.compile_decode()
        kernels["compiled"] = (False, model._compiled_kernel)
        start = time.perf_counter()
        measure_decode(
            model, steps=1, repeats=1, batch_size=args.batch_size, params=params, seed=args.seed, batch=batch
        )
        compile_s = time.perf_counter() - start
    runs: dict[str, list[float]] = {name: [] for name in kernels}
    for r in range(args.repeats):
        for name, (use_c, compiled) in kernels.items():
            model.native_decode, model._compiled_kernel = use_c, compiled
            native.set_rows_per_pass(model, 1 if name == "C row by row" else per_pass)
            one = measure_decode(
                model,
                steps=args.steps,
                repeats=1,
                batch_size=args.batch_size,
                params=params,
                seed=args.seed + r,
                batch=batch,
            )
            runs[name] += one.runs
    default = list(kernels)[-1]
    result: dict[str, dict[str, Any]] = {
        name: {"tokens_per_s": statistics.median(v), "best_tokens_per_s": max(v), "runs": v} for name, v in runs.items()
    }
    out = {
        **result[default],
        "step": default,
        "weights": weights,
        "weights_requested": args.weights,
        "steps_compared": result,
        "batch_size": one.batch_size,  # rows each step decoded (as measure_decode reports it)
        "steps": args.steps,
        "load_average": list(os.getloadavg()),
        "preset": args.preset,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "native": native.unavailable_reason() or "available",
        "compile_s": compile_s,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    base = result["torch"]["tokens_per_s"]
    print(
        f"{args.preset} on {args.device} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
        f"{args.repeats} interleaved repeats of {args.steps} steps (load {out['load_average'][0]:.2f})"
        + (f"; compiled in {compile_s:.0f}s" if compile_s is not None else "")
    )
    model.native_decode, model._compiled_kernel = kernels[default]
    print(
        weights_line(weights, model) + (" (the engine's default for the device)" if args.weights == "default" else "")
    )
    print(f"{'step':<12} {'median tok/s':>13} {'best tok/s':>11} {'vs torch':>9}")
    for name, row in result.items():
        mark = "  <- default" if name == default else ""
        print(
            f"{name:<12} {row['tokens_per_s']:>13.1f} {row['best_tokens_per_s']:>11.1f} "
            f"{row['tokens_per_s'] / base:>8.2f}x{mark}"
        )
    if not c_step and model.device.type == "cpu":
        print(f"(no C step: {native.unavailable_reason() or f'batch above {native.max_rows(model)} rows'})")
    return 0


def run_turns(args: argparse.Namespace) -> int:
    from rxruntime.bench.turns import TurnsConfig, format_table, plot_turns
    from rxruntime.bench.turns import run_turns as run
    from rxruntime.bench.turns_report import describe

    _threads(args)
    extra = [_load_compare(spec) for spec in args.compare]
    cfg = TurnsConfig(
        preset=args.preset,
        turns=args.turns,
        query_tokens=args.query_tokens,
        answer_tokens=args.answer_tokens,
        device=args.device,
        repeats=args.repeats,
        seed=args.seed,
        temperature=args.temperature,
        compile=args.compile,
        weights=args.weights,
        dtype=args.dtype,
        baseline=args.baseline,
        llamacpp_types=args.llamacpp_types,
        llamacpp_timeout_s=args.llamacpp_timeout,
    )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run(cfg, progress=None if args.json else progress)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"turns-{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_turns(result, args.out / f"turns-{args.preset}.png", extra)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    from rich.console import Console

    console = Console()
    console.print(format_table(result))
    for line in describe(result):
        console.print(line, highlight=False)
    if args.out:
        console.print(f"wrote {args.out}/turns-{args.preset}.json and .png")
    return 0


def run_overlap(args: argparse.Namespace) -> int:
    from rxruntime.bench.overlap import OverlapConfig, describe, format_table
    from rxruntime.bench.overlap import run_overlap as run

    _threads(args)
    cfg = OverlapConfig(
        preset=args.preset,
        turns=args.turns,
        query_tokens=args.query_tokens,
        answer_tokens=args.answer_tokens,
        device=args.device,
        seed=args.seed,
        weights=args.weights,
    )
    result = run(cfg, progress=None if args.json else _progress)
    return _report(args, "overlap", result, format_table, describe(result))


def run_replay(args: argparse.Namespace) -> int:
    from rxruntime.bench.replay import ReplayConfig, format_table
    from rxruntime.bench.replay import run_replay as run

    _threads(args)
    cfg = ReplayConfig(turns=args.turns, repeats=args.repeats, seed=args.seed, device=args.device, model=args.model)
    from rxruntime.models.checkpoint import load_defaults

    with load_defaults(tokenizer=args.tokenizer, rxlm_version=args.rxlm_version):  # ReplayConfig names the model only
        result = run(cfg, progress=None if args.json else _progress)
    s = result["summary"]
    note = (
        f"turn {s['turn']}: replaying the history takes {s['replay_over_cached']:.2f}x the cached path, the "
        f"stateless model {s['stateless_over_cached']:.2f}x; replayed answers identical to cached ones: "
        f"{'yes' if s['all_answers_identical'] else 'NO'}"
    )
    args.preset = Path(args.model).name
    return _report(args, "replay", result, format_table, note)


def run_throughput(args: argparse.Namespace) -> int:
    from rxruntime.bench.throughput import ThroughputConfig, describe_limit, format_table
    from rxruntime.bench.throughput import run_throughput as run

    _threads(args)
    cfg = ThroughputConfig(
        preset=args.preset,
        concurrency=args.concurrency,
        query_tokens=args.query_tokens,
        answer_tokens=args.answer_tokens,
        device=args.device,
        seed=args.seed,
        max_batch=args.max_batch,
        warmup=not args.no_warmup,
        weights=args.weights,
        dtype=args.dtype,
        compute_limit=not args.no_compute_limit,
        apart=args.apart,
    )
    result = run(cfg, progress=None if args.json else _progress)
    limited = [r["conversations"] for r in result["results"] if r["limited"]]
    notes = [describe_limit(result)]
    if limited:
        notes.append(f"max batch {result['config']['max_batch']}: levels {limited} queued the conversations beyond it")
    note = "\n".join(n for n in notes if n)
    return _report(args, "throughput", result, format_table, note)


def _report(
    args: argparse.Namespace, name: str, result: dict[str, Any], table: Callable[[dict[str, Any]], Any], note: str
) -> int:
    """``--out`` file, then JSON or the table (and a closing note) on stdout."""
    path = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{name}-{args.preset}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    console.print(table(result))
    if note:
        console.print(note)
    if path is not None:
        console.print(f"wrote {path}")
    return 0


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _levels(text: str) -> list[int]:
    """``1,8,64`` -> [1, 8, 64] (argparse type: a bad value is a usage error)."""
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return levels


def _names(text: str) -> list[str]:
    """``fp32,int8`` -> ["fp32", "int8"] (checked against the choices where they are used)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _load_compare(spec: str) -> tuple[str, list[dict[str, float]]]:
    """``LABEL=FILE``: FILE holds a list of per-turn records or a dict with one such list."""
    from rxruntime.models.errors import RxTError

    label, sep, path = spec.partition("=")
    if not sep:
        raise RxTError(f"--compare takes LABEL=FILE, got {spec!r}")
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise RxTError(f"{path}: expected one list of per-turn records")
        data = lists[0]
    return label, data
