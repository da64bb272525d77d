"""Loading a model two ways side by side: ``rxruntime.load`` from this checkout against the same
call from another checkout (``--old DIR``: a ``git worktree`` of any commit), each in a fresh
process, alternating over ``--rounds``. Each process loads ``--model`` with ``--weights`` and
reports the seconds ``load`` took, its resident memory after, and its peak (``VmHWM``: the
pages it ever held, so the load's own peak). Prints each figure and new/old ratios, writes JSON
to ``--out``.

Issue 23: this measured loading RxT-Beta at full size with the routed experts compacted one MoE
at a time as they are read (and the file read a group at a time) against loading everything as
float32 first:

    git worktree add /tmp/before 64a9583
    python benchmarks/load_ab.py --old /tmp/before --model ~/.cache/rxruntime/beta-full \\
        --out benchmarks/results/beta-full-size-load-ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHILD = """
import json, sys, time
import rxruntime
import rxruntime.models.checkpoint
print("FROM " + rxruntime.models.checkpoint.__file__)
start = time.perf_counter()
engine = rxruntime.load(sys.argv[1], weights=sys.argv[2])
seconds = time.perf_counter() - start
status = open("/proc/self/status").read()
kib = lambda key: int(status.split(key + ":")[1].split()[0])
print("RESULT " + json.dumps({"load_s": seconds, "rss_bytes": kib("VmRSS") * 1024, "peak_bytes": kib("VmHWM") * 1024}))
engine.close()
"""


def _package_view(checkout: Path, into: Path) -> Path:
    """A directory that imports ``rxruntime`` (with its models, operators and training) from
    ``checkout`` ahead of the installed one: the layout setuptools' package-dir maps."""
    package = into / "rxruntime"
    shutil.copytree(checkout / "rxruntime", package, symlinks=True)
    for sub in ("models", "operators", "training"):
        if (checkout / sub).is_dir():
            (package / sub).symlink_to((checkout / sub).resolve())
    return into


def run_side(model: str, weights: str, path: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    with tempfile.TemporaryDirectory() as cwd:  # not a checkout: "-c" puts the working directory first
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, model, weights], capture_output=True, text=True, env=env, check=False, cwd=cwd
        )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"a side failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["rxruntime"] = next(x for x in proc.stdout.splitlines() if x.startswith("FROM ")).removeprefix("FROM ")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="another checkout (a git worktree)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", default="int8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from rxruntime.bench.overlap import cpu_model

    sides: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        old_path = _package_view(args.old, Path(tmp))
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for side in order:
                got = run_side(args.model, args.weights, old_path if side == "old" else None)
                sides[side].append(got)
                print(
                    f"round {r + 1} {side}: load {got['load_s']:.1f} s, resident {got['rss_bytes'] / 2**30:.2f} GiB, "
                    f"peak {got['peak_bytes'] / 2**30:.2f} GiB",
                    flush=True,
                )
    summary = {
        key: {side: statistics.median(x[key] for x in runs) for side, runs in sides.items()}
        for key in ("load_s", "rss_bytes", "peak_bytes")
    }
    for key, values in summary.items():
        print(f"{key}: old {values['old']:.4g}, new {values['new']:.4g}, new/old {values['new'] / values['old']:.2f}x")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "cpu": cpu_model(),
                    "cores": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                    "command": " ".join(["python", "benchmarks/load_ab.py", *(argv or sys.argv[1:])]),
                    "model": args.model,
                    "weights": args.weights,
                    "runs": sides,
                    "median": summary,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
