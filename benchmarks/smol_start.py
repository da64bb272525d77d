"""How fast a backbone model starts and decodes the way ``rxrt chat`` runs it.

Times ``rxruntime.load(MODEL)`` (what ``rxrt chat`` calls) twice in fresh processes: the first
start with an empty dequantized-backbone cache (``$RXRT_BACKBONE_DIR/dequantized``: the GGUF is
dequantized and the cache written), the second reading the cache. Then, in the second process,
the decode step ``rxrt chat`` gets (the C step with int8 weights, or why not) and its tokens/s
(``rxruntime.bench.measure_decode``, batch 1, greedy), with the load average beside it.

    python benchmarks/smol_start.py --model runs/smol/model --threads 2 --backbone-dir /tmp/bb

``--backbone-dir`` must hold (or be able to fetch) the backbone's GGUF; the script empties its
``dequantized/`` folder first. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
start = time.perf_counter()
import rxruntime
engine = rxruntime.load(sys.argv[1], device="cpu")
loaded = time.perf_counter() - start
from rxruntime.bench import measure_decode
from rxruntime.models import native
model = engine.model
out = {"load_s": round(loaded, 2), "c_step": native.not_used_reason(model) or "used",
       "weights": getattr(model, "weight_format", None)}
if sys.argv[3] == "1":
    r = measure_decode(model, steps=int(sys.argv[4]), repeats=3, batch_size=1)
    out |= {"decode_tokens_per_s": round(r.tokens_per_s, 1), "best_tokens_per_s": round(r.best_tokens_per_s, 1),
            "load_average": os.getloadavg()}
engine.close()
print(json.dumps(out))
"""


def _start(model: str, threads: int, decode: bool, steps: int) -> dict[str, object]:
    argv = [sys.executable, "-c", _CHILD, model, str(threads), "1" if decode else "0", str(steps)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model directory (compact or full)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per repeat")
    p.add_argument("--backbone-dir", required=True, help="the backbone cache to use ($RXRT_BACKBONE_DIR)")
    args = p.parse_args()
    folder = Path(args.backbone_dir)
    shutil.rmtree(folder / "dequantized", ignore_errors=True)
    os.environ["RXRT_BACKBONE_DIR"] = str(folder)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    first = _start(args.model, args.threads, False, args.steps)
    second = _start(args.model, args.threads, True, args.steps)
    print(json.dumps({"model": args.model, "threads": args.threads, "first_start": first, "second_start": second}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
