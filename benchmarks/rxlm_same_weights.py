"""Speed on the same weights: one RxLM checkpoint in RxLM's ``interact`` and in rxruntime, one run.

Issue 11 asks how fast rxruntime serves an RxLM model compared with RxLM itself, on identical
weights. This driver runs in rxruntime's environment. Each RxLM version runs as a long-lived
``benchmarks/rxlm_env/rxlm_turns.py serve`` process in its own virtual environment (RxLM pins
transformers < 5), rxruntime runs in-process, and all load one checkpoint directory written by
RxLM's ``save_pretrained`` (alpha-mini, random weights, ``[EOS]`` unreachable so every side decodes
the same lengths)::

    python benchmarks/rxlm_same_weights.py --checkpoint /tmp/alpha-mini-rxlm \\
        --rxlm /work/venvs/rxlm-0.3.80/bin/python --rxlm /work/venvs/rxlm-0.2.31/bin/python \\
        --threads 2 --out benchmarks/results/rxlm-same-weights.json

A missing checkpoint is written first by the oldest RxLM given (its layout loads in every
version). The sides take turns, turn t of every side before turn t + 1 of any (and likewise for
batch rounds), so load from other processes on a shared machine hits all sides alike:

* ``turns``: one conversation at batch 1, greedy, the same query ids and initial STM everywhere:
  per turn ``ttft_s``, ``turn_s``, ``tokens_per_s`` (after the first token), ``memory_update_s``.
  RxLM runs ``interact`` (memory update synchronous, between -1 and -2); rxruntime runs the
  engine's decode path (``DecodeBatch``) and times ``memory_update`` on its own, as
  ``rxrt bench turns`` does. The first 8 tokens of every answer are kept, to compare.
* ``batch``: for each level of ``--conversations`` (16 and 64), one turn of that many
  conversations at once: RxLM's ``batch_interact`` against rxruntime's ``Engine`` (continuous
  batching, real event stream): aggregate tokens/s, the median of ``--batch-rounds`` rounds, the
  ratio, and beside it the machine's compute limit for the work (``rxruntime.bench.throughput.
  compute_limit``: the peak matrix-product rate of the arithmetic rxruntime's weights call for,
  over the FLOPs of one generated token) with the fraction each side reaches.

rxruntime runs ``--weights`` (``default``: the engine's own for the device, int8 where the C step
runs, what ``rxrt serve`` runs; ``fp32`` keeps RxLM's float32 values exactly).

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
RXLM_SIDE = HERE / "rxlm_env" / "rxlm_turns.py"
FIRST_ID = 7  # ids 0-6 are special tokens in both frameworks' tokenizers


def rxlm_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('rxlm'))"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def queries(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_ID, vocab, (length,), generator=gen).tolist() for _ in range(count)]


class RxlmSide:
    """A ``rxlm_turns.py serve`` process: one JSON request in, one JSON reply out, per line."""

    def __init__(self, python: str, checkpoint: Path, threads: int, log: Path) -> None:
        self.log = log.open("w")
        cmd = [python, str(RXLM_SIDE), "serve", "--checkpoint", str(checkpoint), "--threads", str(threads)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=HERE.parent
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the RxLM process ended (exit {self.proc.wait()}); see {self.log.name}")
            at = line.find("{")  # RxLM prints to stdout too, without a newline
            if at >= 0:
                try:
                    reply: dict[str, Any] = json.loads(line[at:])
                except json.JSONDecodeError:
                    continue
                return reply

    def call(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def turn(self, prompt: list[int], answer_tokens: int) -> tuple[dict[str, float], list[int]]:
        reply = self.call(op="turn", ids=prompt[:-1], answer_tokens=answer_tokens)  # interact appends [A]
        return {k: reply[k] for k in TURN_KEYS}, reply["answer"]

    def reset(self) -> None:
        self.call(op="reset")

    def batch(self, qs: list[list[int]], answer_tokens: int) -> dict[str, Any]:
        return self.call(op="batch", queries=qs, answer_tokens=answer_tokens)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


class RxruntimeSide:
    """``interact``'s protocol on the engine's decode path (``DecodeBatch``, greedy), the memory
    update timed on its own after the answer as ``rxrt bench turns`` does; batches through the
    real ``Engine``."""

    def __init__(
        self,
        checkpoint: Path,
        threads: int,
        weights: str = "default",
        rows_per_pass: int | None = None,
        together: bool = True,
    ) -> None:
        from rxruntime.bench.decode import apply_weights, c_step_note
        from rxruntime.models import DecodeBatch, SamplingParams, native
        from rxruntime.models.checkpoint import load_pretrained

        self.model, tokenizer = load_pretrained(checkpoint, device="cpu", dtype=torch.float32)
        assert tokenizer is not None, f"{checkpoint} holds no tokenizer"
        self.tokenizer = tokenizer
        fmt = apply_weights(self.model, weights)
        if rows_per_pass is not None:  # 1: the C step as it was before its multi-row kernels
            native.set_rows_per_pass(self.model, rows_per_pass)
        self.params = SamplingParams(temperature=0.0)
        self.decode = DecodeBatch(self.model, capacity=1)
        self.info = {"api": "DecodeBatch (engine decode path); Engine for batches", "threads": threads}
        self.info["c_decode_step"] = c_step_note(self.model)
        self.info["weights"], self.info["weights_requested"] = fmt, weights
        self.info["rows_per_pass"] = native.rows_per_pass(self.model)
        self.together = together  # a batch's sends in one Engine.together() block (one prefill)
        self.info["batch_sends"] = "together" if together else "apart"
        self.engine: Any = None
        self.reset()

    def reset(self) -> None:
        c = self.model.config
        self.stm = torch.randn((c.num_layers, c.stm_size, c.dim), generator=torch.Generator().manual_seed(0))

    def turn(self, prompt: list[int], answer_tokens: int) -> tuple[dict[str, float], list[int]]:
        from rxruntime.models import JoinRequest

        key = object()
        start = time.perf_counter()
        answer = [int(self.decode.join([JoinRequest(key, prompt, self.stm, self.params, 0)])[0])]
        ttft = time.perf_counter() - start
        for _ in range(answer_tokens - 1):
            answer.append(int(self.decode.step()[0]))
        total = time.perf_counter() - start
        self.decode.leave(key)
        start = time.perf_counter()
        with torch.inference_mode():  # what RxLM's update reads: the query, [A] and the answer
            self.stm = self.model.memory_update(self.stm[None], torch.tensor([[*prompt, *answer]]))[0]
        update = time.perf_counter() - start
        rate = (answer_tokens - 1) / (total - ttft)
        return {"ttft_s": ttft, "turn_s": total, "tokens_per_s": rate, "memory_update_s": update}, answer

    def batch(self, qs: list[list[int]], answer_tokens: int) -> dict[str, Any]:
        from rxruntime.bench.throughput import run_level, summarize
        from rxruntime.engine import Engine

        if self.engine is not None and self.engine.stats()["max_batch"] < len(qs):
            self.engine.close()
            self.engine = None
        if self.engine is None:
            self.engine = Engine(self.model, self.tokenizer, max_batch=len(qs))
        return summarize(
            run_level(self.engine, qs, answer_tokens, 0, f"b{time.monotonic_ns()}", together=self.together), len(qs)
        )

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


TURN_KEYS = ("ttft_s", "turn_s", "tokens_per_s", "memory_update_s")


def run_interleaved(
    sides: dict[str, Any], prompts: list[list[int]], answer_tokens: int, progress: bool = True
) -> dict[str, Any]:
    """Turn t of every side before turn t + 1 of any: load on the machine hits all sides alike."""
    for side in sides.values():  # warm-up turn, then every side starts from the same STM
        side.turn(prompts[0], min(8, answer_tokens))
        side.reset()
    out: dict[str, Any] = {name: {"turns": [], "answers": {"first_8_tokens": []}} for name in sides}
    for t, prompt in enumerate(prompts, start=1):
        for name, side in sides.items():
            rec, answer = side.turn(prompt, answer_tokens)
            out[name]["turns"].append({"turn": t, **rec})
            out[name]["answers"]["first_8_tokens"].append(answer[:8])
            if progress:
                print(f"turn {t} {name}: {rec['tokens_per_s']:.1f} tokens/s, {rec['turn_s']:.2f} s", file=sys.stderr)
    return out


def run_batches(sides: dict[str, Any], qs: list[list[int]], answer_tokens: int, rounds: int) -> dict[str, Any]:
    """A warm-up batch per side, then ``rounds`` timed batches, sides alternating; medians."""
    for side in sides.values():
        side.batch(qs, min(4, answer_tokens))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, side in sides.items():
            runs[name].append(side.batch(qs, answer_tokens))
            print(f"batch round {r + 1} {name}: {runs[name][-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return {
        name: {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in xs),
            "wall_s": statistics.median(x["wall_s"] for x in xs),
            "rounds": xs,
        }
        for name, xs in runs.items()
    }


def run_levels(
    sides: dict[str, Any], levels: list[int], query_tokens: int, vocab: int, answer_tokens: int, rounds: int
) -> dict[str, Any]:
    """:func:`run_batches` at each number of conversations, keyed by it."""
    return {str(n): run_batches(sides, queries(n, query_tokens, vocab, 2), answer_tokens, rounds) for n in levels}


def summarize_batches(
    batches: dict[str, Any], limit: dict[str, Any] | None, prompt_share: float = 0.0
) -> dict[str, Any]:
    """Per level: each side's tokens/s, rxruntime's ratio over each other side, and each side's
    fraction of the compute limit: of the decode steps' limit (``compute_fraction``), and of the
    limit for the whole work in the wall time (``work_fraction``: the prompts are read too, at
    about a generated token's FLOPs each; ``prompt_share`` = prompt tokens / all tokens)."""
    out: dict[str, Any] = {}
    for level, sides in batches.items():
        ours = sides.get("rxruntime", {}).get("tokens_per_s")
        row: dict[str, Any] = {}
        for name, b in sides.items():
            if "tokens_per_s" not in b:
                continue
            entry: dict[str, Any] = {"tokens_per_s": b["tokens_per_s"]}
            if limit is not None:
                entry["compute_fraction"] = b["tokens_per_s"] / limit["limit_tokens_per_s"]
                entry["work_fraction"] = entry["compute_fraction"] / (1.0 - prompt_share)
            if ours is not None and name != "rxruntime":
                entry["rxruntime_ratio"] = ours / b["tokens_per_s"]
            row[name] = entry
        out[level] = row
    return out


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
    limit = result["summary"].get("compute_limit")
    lines += [
        "",
        "| conversations | side | tokens/s | wall s | rxruntime ratio | of compute limit | with the prompts |",
        "|" + " --- |" * 7,
    ]
    for level, sides in result["batch"].items():
        summary = result["summary"].get("batch", {}).get(level, {})
        for name, b in sides.items():
            if "tokens_per_s" not in b:
                lines.append(f"| {level} | {name} | failed: {b.get('error')} | | | | |")
                continue
            s = summary.get(name, {})
            ratio = f"{s['rxruntime_ratio']:.2f}x" if "rxruntime_ratio" in s else ""
            share = f"{100 * s['compute_fraction']:.2f}%" if "compute_fraction" in s else ""
            work = f"{100 * s['work_fraction']:.2f}%" if "work_fraction" in s else ""
            row = f"| {level} | {name} | {b['tokens_per_s']:.1f} | {b['wall_s']:.2f} | {ratio} | {share} | {work} |"
            lines.append(row)
    if limit:
        peaks = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in limit["peak_flops"].items())
        lines.append(
            f"\ncompute limit {limit['limit_tokens_per_s']:.0f} tokens/s ({limit['arithmetic']}: {peaks}; "
            f"{limit['flops_per_token'] / 1e6:.1f} MFLOP per token); CPU {result['config'].get('cpu_model')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="RxLM model dir (written if missing)")
    parser.add_argument("--rxlm", action="append", required=True, help="python of an RxLM venv (repeatable)")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument(
        "--conversations", type=levels, default=[16, 64], help="comma-separated numbers of conversations (16,64)"
    )
    parser.add_argument(
        "--weights",
        default="default",
        help="rxruntime's weights: default (the engine's own: int8 where the C step "
        "runs), fp32 (RxLM's values exactly), bf16, int8",
    )
    parser.add_argument("--batch-answer-tokens", type=int, default=32)
    parser.add_argument("--batch-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a missing checkpoint is written tiny (smoke runs)")
    parser.add_argument("--skip", choices=["turns", "batch"], action="append", default=[])
    parser.add_argument(
        "--rowwise-side",
        action="store_true",
        help="also run rxruntime with one row per pass (rxruntime-rowwise: the C step before its multi-row kernels)",
    )
    parser.add_argument(
        "--apart-side",
        action="store_true",
        help="also run rxruntime with each batch's queries sent as independent clients "
        "(rxruntime-apart; rxruntime sends them in one Engine.together() block)",
    )
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
    load_avg = [os.getloadavg()[0]]

    sides: dict[str, Any] = {}
    errors: dict[str, str] = {}
    limit: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, py in enumerate(args.rxlm):
            if i == 1 or len(args.rxlm) == 1:
                add_ours(sides, errors, args.checkpoint, args.threads, args.weights)
                if args.rowwise_side:
                    add_ours(sides, errors, args.checkpoint, args.threads, args.weights, "rxruntime-rowwise", 1)
                if args.apart_side:
                    add_ours(
                        sides, errors, args.checkpoint, args.threads, args.weights, "rxruntime-apart", together=False
                    )
            sides[f"rxlm-{versions[py]}"] = RxlmSide(py, args.checkpoint, args.threads, Path(tmp) / f"rxlm-{i}.log")
        try:
            result: dict[str, Any] = {"turns": {}, "batch": {}, "errors": errors}
            if "turns" not in args.skip:
                special = config["tokenizer_config"]
                head = [special["bos_token_id"], special["query_token_id"]]
                prompts = [
                    [*head, *q, special["answer_token_id"]] for q in queries(args.turns, args.query_tokens, vocab, 1)
                ]
                result["turns"] = run_interleaved(sides, prompts, args.answer_tokens)
            if "batch" not in args.skip:
                result["batch"] = run_levels(
                    sides, args.conversations, args.query_tokens, vocab, args.batch_answer_tokens, args.batch_rounds
                )
            result["sides"] = {name: side.info for name, side in sides.items()}
            if "rxruntime" in sides and "batch" not in args.skip:  # after the runs, the RxLM processes idle
                from rxruntime.bench.throughput import compute_limit

                context = args.query_tokens + 3 + args.batch_answer_tokens / 2
                limit = compute_limit(sides["rxruntime"].model, context)
        finally:
            for side in sides.values():
                side.close()
    load_avg.append(os.getloadavg()[0])
    result["summary"] = {
        "turns": summarize_turns(result["turns"]),
        "batch": summarize_batches(
            result["batch"], limit, (args.query_tokens + 3) / (args.query_tokens + 3 + args.batch_answer_tokens)
        ),
        "compute_limit": limit,
    }
    result["config"] = {
        "checkpoint": str(args.checkpoint),
        "saved_by": "RxLM save_pretrained (alpha-mini, random weights, [EOS] unreachable)",
        "rxlm_versions": sorted(versions.values()),
        "order": "interleaved: turn t (and each batch round) of every side before the next",
        "turns": args.turns,
        "query_tokens": args.query_tokens,
        "answer_tokens": args.answer_tokens,
        "conversations": args.conversations,
        "batch_answer_tokens": args.batch_answer_tokens,
        "batch_rounds": args.batch_rounds,
        "threads": args.threads,
        "sampling": "greedy",
        "dtype": "float32",
        "device": "cpu",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "load_average_start_end": load_avg,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(table(result), file=sys.stderr)
    return 0


def levels(text: str) -> list[int]:
    """``16,64`` -> [16, 64] (argparse type)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the record: development machines differ."""
    from rxruntime.bench.overlap import cpu_model as model_name

    return model_name()


def add_ours(
    sides: dict[str, Any],
    errors: dict[str, str],
    checkpoint: Path,
    threads: int,
    weights: str,
    name: str = "rxruntime",
    rows_per_pass: int | None = None,
    together: bool = True,
) -> None:
    """An rxruntime side, or the reason it cannot load the directory (the other sides still run)."""
    try:
        sides[name] = RxruntimeSide(checkpoint, threads, weights, rows_per_pass, together)
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
        print(f"rxruntime cannot load {checkpoint}: {errors[name]}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
