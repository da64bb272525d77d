"""Speed on the same weights: one RxLM checkpoint in RxLM's ``interact`` and in rxruntime, one run.

Issue 11 asks how fast rxruntime serves an RxLM model compared with RxLM itself, on identical
weights. This driver runs in rxruntime's environment. It drives the RxLM side as subprocesses
(benchmarks/rxlm_turns.py, one per RxLM virtual environment; RxLM pins transformers < 5) and the
rxruntime side in-process, all on one checkpoint directory written by RxLM's ``save_pretrained``
(alpha-mini, random weights, ``[EOS]`` unreachable so every side decodes the same lengths)::

    python benchmarks/rxlm_same_weights.py --checkpoint /tmp/alpha-mini-rxlm \\
        --rxlm /work/venvs/rxlm-0.3.80/bin/python --rxlm /work/venvs/rxlm-0.2.31/bin/python \\
        --threads 2 --out benchmarks/results/rxlm-same-weights.json

A missing checkpoint is written first by the oldest RxLM given (its layout loads in every
version). Two parts, each in the order RxLM (first ``--rxlm``), rxruntime, RxLM (the others), so
that rxruntime's minutes sit between RxLM's on a shared machine:

* ``turns``: one conversation at batch 1, greedy, the same query ids and initial STM everywhere:
  per turn ``ttft_s``, ``turn_s``, ``tokens_per_s`` (after the first token), ``memory_update_s``.
  RxLM runs ``interact`` (memory update synchronous, between -1 and -2); rxruntime runs the
  engine's decode path (``DecodeBatch``) and times ``memory_update`` on its own, as
  ``rxrt bench turns`` does. The first 8 tokens of every answer are kept, to compare.
* ``batch``: one turn of ``--conversations`` conversations at once: RxLM's ``batch_interact``
  against rxruntime's ``Engine`` (continuous batching, real event stream): aggregate tokens/s.

Where rxruntime cannot load the directory, its side records the error and the other sides still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RXLM_SIDE = HERE / "rxlm_turns.py"
FIRST_ID = 7  # ids 0-6 are special tokens in both frameworks' tokenizers


def rxlm_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('rxlm'))"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def run_rxlm(python: str, command: str, args: list[str]) -> dict[str, Any]:
    """One RxLM-side run; its JSON (the last thing it prints) or the failure."""
    proc = subprocess.run(
        [python, str(RXLM_SIDE), command, *args], capture_output=True, text=True, check=False, cwd=HERE.parent
    )
    sys.stderr.write(proc.stderr[-2000:])
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    side: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{") :])
    if "rxlm" in side:  # the per-turn records, under the name `rxrt bench turns --compare` reads
        side["turns"] = side.pop("rxlm")
    return side


def queries(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_ID, vocab, (length,), generator=gen).tolist() for _ in range(count)]


# ---------------------------------------------------------------------- the rxruntime side
def load_rxruntime(checkpoint: Path) -> tuple[Any, Any]:
    from rxruntime.models.checkpoint import load_pretrained

    return load_pretrained(checkpoint, device="cpu", dtype=torch.float32)


def rxruntime_turns(model: Any, prompts: list[list[int]], answer_tokens: int, threads: int) -> dict[str, Any]:
    """``interact``'s protocol on the engine's decode path: greedy, fixed length, update timed alone."""
    from rxruntime.bench.decode import c_step_note
    from rxruntime.models import DecodeBatch, JoinRequest, SamplingParams

    params = SamplingParams(temperature=0.0)
    batch = DecodeBatch(model, capacity=1)
    c = model.config
    stm0 = torch.randn((c.num_layers, c.stm_size, c.dim), generator=torch.Generator().manual_seed(0))

    def turn(stm: torch.Tensor, prompt: list[int], key: object) -> tuple[dict[str, float], list[int], torch.Tensor]:
        start = time.perf_counter()
        answer = [int(batch.join([JoinRequest(key, prompt, stm, params, 0)])[0])]
        ttft = time.perf_counter() - start
        for _ in range(answer_tokens - 1):
            answer.append(int(batch.step()[0]))
        total = time.perf_counter() - start
        batch.leave(key)
        start = time.perf_counter()
        with torch.inference_mode():
            new = model.memory_update(stm[None], torch.tensor([[*prompt, *answer]]))[0]
        update = time.perf_counter() - start
        rec = {"ttft_s": ttft, "turn_s": total, "tokens_per_s": (answer_tokens - 1) / (total - ttft)}
        return {**rec, "memory_update_s": update}, answer, new

    turn(stm0, prompts[0], "warm-up")
    stm, records, heads = stm0, [], []
    for t, prompt in enumerate(prompts, start=1):
        rec, answer, stm = turn(stm, prompt, ("turn", t))
        records.append({"turn": t, **rec})
        heads.append(answer[:8])
        print(f"rxruntime turn {t}: {rec}", file=sys.stderr, flush=True)
    return {
        "turns": records,
        "answers": {"first_8_tokens": heads},
        "config": {"api": "DecodeBatch (engine decode path)", "c_decode_step": c_step_note(model), "threads": threads},
    }


def rxruntime_batch(model: Any, tokenizer: Any, qs: list[list[int]], answer_tokens: int) -> dict[str, Any]:
    from rxruntime.bench.throughput import run_level, summarize
    from rxruntime.engine import Engine

    with Engine(model, tokenizer, max_batch=len(qs)) as engine:
        run_level(engine, qs, answer_tokens, 0, "warm-up")
        traces = run_level(engine, qs, answer_tokens, 0, "timed")
    return {**summarize(traces, len(qs)), "config": {"api": "Engine (continuous batching, event stream)"}}


# ---------------------------------------------------------------------- summary
def summarize_turns(sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per side, the medians over turns; for RxLM sides, rxruntime's speed-up and matching answers."""
    keys = ("tokens_per_s", "ttft_s", "turn_s", "memory_update_s")
    out: dict[str, Any] = {
        name: {f"{k}_median": statistics.median(t[k] for t in side["turns"]) for k in keys}
        for name, side in sides.items()
        if "turns" in side
    }
    ours = out.get("rxruntime")
    for name, s in out.items():
        if ours is None or name == "rxruntime":
            continue
        s["rxruntime_speedup_tokens_per_s"] = ours["tokens_per_s_median"] / s["tokens_per_s_median"]
        s["rxruntime_speedup_turn_s"] = s["turn_s_median"] / ours["turn_s_median"]
        heads = [sides[k].get("answers", {}).get("first_8_tokens", []) for k in (name, "rxruntime")]
        pairs = list(zip(*heads))
        s["same_answer_heads"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        "| side | tokens/s | TTFT s | turn s | memory update s | rxruntime speed-up (tokens/s) |",
        "|" + " --- |" * 6,
    ]
    for name, s in result["summary"]["turns"].items():
        ratio = s.get("rxruntime_speedup_tokens_per_s")
        lines.append(
            f"| {name} | {s['tokens_per_s_median']:.1f} | {s['ttft_s_median']:.3f} | {s['turn_s_median']:.2f} | "
            f"{s['memory_update_s_median']:.3f} | {f'{ratio:.1f}x' if ratio else ''} |"
        )
    lines += ["", "| side, batch | tokens/s | wall s |", "| --- | --- | --- |"]
    for name, b in result["batch"].items():
        if "tokens_per_s" in b:
            lines.append(f"| {name} | {b['tokens_per_s']:.1f} | {b['wall_s']:.2f} |")
        else:
            lines.append(f"| {name} | failed: {b.get('error')} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="RxLM model dir (written if missing)")
    parser.add_argument("--rxlm", action="append", required=True, help="python of an RxLM venv (repeatable)")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--batch-answer-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a missing checkpoint is written tiny (smoke runs)")
    parser.add_argument("--skip", choices=["turns", "batch"], action="append", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    versions = {py: rxlm_version(py) for py in args.rxlm}
    if not (args.checkpoint / "config.json").is_file():
        oldest = min(args.rxlm, key=lambda py: tuple(int(x) for x in versions[py].split(".")[:3]))
        save = [oldest, str(RXLM_SIDE), "save", str(args.checkpoint), *(["--tiny"] if args.tiny else [])]
        subprocess.run(save, check=True)
    config = json.loads((args.checkpoint / "config.json").read_text())
    vocab = config["decoder_config"]["vocab_size"]
    turn_queries = queries(args.turns, args.query_tokens, vocab, seed=1)
    batch_queries = queries(args.conversations, args.query_tokens, vocab, seed=2)
    load_avg = [os.getloadavg()[0]]

    try:
        model, tokenizer = load_rxruntime(args.checkpoint)
        ours_error = None
    except Exception as exc:
        model = tokenizer = None
        ours_error = f"{type(exc).__name__}: {exc}"
        print(f"rxruntime cannot load {args.checkpoint}: {ours_error}", file=sys.stderr)

    first, rest = args.rxlm[:1], args.rxlm[1:]
    result: dict[str, Any] = {"turns": {}, "batch": {}}
    with tempfile.TemporaryDirectory() as tmp:
        qfile, bfile = Path(tmp) / "turns.json", Path(tmp) / "batch.json"
        qfile.write_text(json.dumps(turn_queries))
        bfile.write_text(json.dumps(batch_queries))
        common = ["--checkpoint", str(args.checkpoint), "--threads", str(args.threads)]
        common += ["--query-tokens", str(args.query_tokens)]
        for part in ("turns", "batch"):
            if part in args.skip:
                continue
            if part == "turns":
                extra = [
                    "--queries",
                    str(qfile),
                    "--turns",
                    str(args.turns),
                    "--answer-tokens",
                    str(args.answer_tokens),
                ]
            else:
                extra = ["--queries", str(bfile), "--conversations", str(args.conversations)]
                extra += ["--answer-tokens", str(args.batch_answer_tokens)]
            for py in first:
                result[part][f"rxlm-{versions[py]}"] = run_rxlm(py, part, common + extra)
            if model is None:
                result[part]["rxruntime"] = {"error": ours_error}
            elif part == "turns":
                ids = model.config.special_tokens
                bos, q, a = ids.bos_id, ids.query_id, ids.answer_id
                prompts = [[bos, q, *x, a] for x in turn_queries]
                result[part]["rxruntime"] = rxruntime_turns(model, prompts, args.answer_tokens, args.threads)
            else:
                result[part]["rxruntime"] = rxruntime_batch(model, tokenizer, batch_queries, args.batch_answer_tokens)
            for py in rest:
                result[part][f"rxlm-{versions[py]}"] = run_rxlm(py, part, common + extra)
    load_avg.append(os.getloadavg()[0])
    result["summary"] = {"turns": summarize_turns(result["turns"])}
    result["config"] = {
        "checkpoint": str(args.checkpoint),
        "saved_by": "RxLM save_pretrained (alpha-mini, random weights, [EOS] unreachable)",
        "rxlm_versions": sorted(versions.values()),
        "turns": args.turns,
        "query_tokens": args.query_tokens,
        "answer_tokens": args.answer_tokens,
        "conversations": args.conversations,
        "batch_answer_tokens": args.batch_answer_tokens,
        "threads": args.threads,
        "sampling": "greedy",
        "dtype": "float32",
        "device": "cpu",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_start_end": load_avg,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(table(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
