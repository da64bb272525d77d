"""TensorBLEU vs NLTK's per-sentence loop on the same batch of token ids.

    python benchmarks/tensorbleu.py --batch 256 --len 256 --device cpu --json out.json

For each (batch, length) pair it times, on one random batch:

* NLTK: ``ids.cpu().tolist()`` then ``sentence_bleu`` for every row (what a training loop that
  rewards with NLTK has to do), and
* TensorBLEU: ``sentence_bleu`` on the tensors where they live (synchronised on CUDA),

and prints the median of ``--repeats`` runs after ``--warmup`` runs, the ratio, and the largest
difference between the two sets of scores (a benchmark that computed something else would be
meaningless). ``--compare-dictionaries`` also times the counting step with the default chained
dictionary and with the ``torch.unique(dim=0)`` one. References are noisy copies of the
candidates, so higher-order n-grams match too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import nltk
import torch
from nltk.translate.bleu_score import SmoothingFunction
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

from rxruntime.training.tensorbleu import _ngram_stats, sentence_bleu


def make_batch(
    batch: int, length: int, refs: int, vocab: int, noise: float, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random candidates ``[B, L]`` and references ``[B, R, L]``: each reference is the candidate
    with a fraction ``noise`` of its tokens replaced, as a model's sample against a target."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.randint(0, vocab, (batch, length), generator=g)
    ref = cand[:, None, :].repeat(1, refs, 1)
    swap = torch.rand(ref.shape, generator=g) < noise
    ref[swap] = torch.randint(0, vocab, (int(swap.sum()),), generator=g)
    return cand.to(device), ref.to(device)


def time_median(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` untimed calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nltk_scores(cand: torch.Tensor, ref: torch.Tensor, method: int) -> list[float]:
    """NLTK's loop, including the device-to-host copy it needs."""
    fn = getattr(SmoothingFunction(), f"method{method}")
    hyps = cand.cpu().tolist()
    refs = ref.cpu().tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [float(nltk_sentence_bleu(r, h, smoothing_function=fn)) for h, r in zip(hyps, refs)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    rows = []
    for batch in args.batch:
        for length in args.len:
            cand, ref = make_batch(batch, length, args.refs, args.vocab, args.noise, args.seed, device)
            ours = sentence_bleu(cand, ref, smoothing=args.smoothing)
            theirs = nltk_scores(cand, ref, args.smoothing)
            max_diff = max((abs(a - b) for a, b in zip(ours.tolist(), theirs)), default=0.0)
            t_nltk = time_median(partial(nltk_scores, cand, ref, args.smoothing), args.repeats, args.warmup, device)
            t_ours = time_median(
                partial(sentence_bleu, cand, ref, smoothing=args.smoothing), args.repeats, args.warmup, device
            )
            row = dict(
                batch=batch,
                length=length,
                refs=args.refs,
                nltk_s=t_nltk,
                tensorbleu_s=t_ours,
                speedup=t_nltk / t_ours,
                max_abs_diff=max_diff,
                mean_bleu=float(ours.mean()),
            )
            if args.compare_dictionaries:
                # Counting only, with each way of building the compact dictionary.
                for key, rows_dictionary in (("count_chained_s", False), ("count_unique_dim0_s", True)):
                    count = partial(_ngram_stats, cand, ref, rows_dictionary=rows_dictionary)
                    row[key] = time_median(count, args.repeats, args.warmup, device)
            rows.append(row)
            print(_format_row(row), flush=True)
    return dict(
        command="python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        cpu_count=os.cpu_count(),
        load_average=os.getloadavg(),  # other work on a shared machine skews timings
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        nltk=nltk.__version__,
        python=platform.python_version(),
        vocab=args.vocab,
        noise=args.noise,
        smoothing=args.smoothing,
        repeats=args.repeats,
        warmup=args.warmup,
        results=rows,
    )


HEADER = "| batch | len | refs | NLTK loop (s) | TensorBLEU (s) | speed-up | max abs diff |"


HEADER_DICTIONARIES = " counting, chained (s) | counting, unique(dim=0) (s) |"


def _format_row(row: dict[str, Any]) -> str:
    line = (
        f"| {row['batch']} | {row['length']} | {row['refs']} | {row['nltk_s']:.4f} | {row['tensorbleu_s']:.4f} "
        f"| {row['speedup']:.1f}x | {row['max_abs_diff']:.1e} |"
    )
    if "count_chained_s" in row:
        line += f" {row['count_chained_s']:.4f} | {row['count_unique_dim0_s']:.4f} |"
    return line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[256], help="batch sizes (several allowed)")
    p.add_argument("--len", type=int, nargs="+", default=[256], help="sequence lengths (several allowed)")
    p.add_argument("--refs", type=int, default=1, help="references per candidate")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the random ids")
    p.add_argument("--noise", type=float, default=0.3, help="fraction of reference tokens replaced")
    p.add_argument("--smoothing", type=int, default=1, choices=[0, 1, 2, 3, 4, 5, 7], help="NLTK method number")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare-dictionaries",
        action="store_true",
        help="also time the counting step with the chained dictionary and with torch.unique(dim=0)",
    )
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"device={args.device} threads={torch.get_num_threads()} cpus={os.cpu_count()} smoothing=method{args.smoothing}"
    )
    extra = args.compare_dictionaries
    print(HEADER + (HEADER_DICTIONARIES if extra else ""))
    print("|---:" * (9 if extra else 7) + "|")
    report = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
