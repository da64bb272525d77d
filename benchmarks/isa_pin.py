"""Whether a recipe's first training steps give the same tensors with CPU kernels pinned or not.

Runs ``rxrt train --recipe RECIPE --stop-after STEPS`` once per setting, each in a fresh process
(the variables must be set before torch's first kernel), and digests the tensors of the resumable
state it leaves (weights and optimizer moments; not its timings). Settings:

* ``native``: nothing set (the CPU's fastest kernels);
* ``native-again``: the same once more (is the run repeatable at all);
* ``avx2``: the variables ``Recipe.isa = "avx2"`` sets (``training.trainer.ISA_ENVIRONMENT``);
* ``scalar``: ATen's plain kernels (``ATEN_CPU_CAPABILITY=default``), a control that the
  variables reach the run.

``--compare FILE`` also compares with a record made on another machine: the same recipe, steps
and digests there mean a pinned run could resume across the two. ::

    python benchmarks/isa_pin.py --recipe smol3 --steps 2 --out benchmarks/results/isa-pin-smol3-zen3.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from rxruntime.bench.overlap import cpu_model
from rxruntime.training.state import STATE_FILE
from rxruntime.training.trainer import ISA_ENVIRONMENT

SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "native-again": {},
    "avx2": ISA_ENVIRONMENT["avx2"],
    "scalar": {"ATEN_CPU_CAPABILITY": "default"},
}


def tensor_digest(path: Path) -> str:
    """SHA-256 over every tensor of a safetensors file, by name (its metadata left out)."""
    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for name in sorted(f.keys()):
            digest.update(name.encode())
            digest.update(f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


MKL_BRANCH = (
    "import ctypes, os, torch\n"
    "lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), 'lib', 'libtorch_cpu.so'))\n"
    "get = getattr(lib, 'mkl_serv_cbwr_get', None)\n"
    "print(-1 if get is None else get(1))"
)
"""MKL's conditional-reproducibility branch in a process with a setting's environment (its
``mkl_cbwr_get(MKL_CBWR_BRANCH)``: 1 off, 2 automatic, 3 compatible, 10 AVX2; -1 where the symbol is
not exported)."""


def mkl_branch(env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", MKL_BRANCH], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


def run(recipe: str, steps: int, setting: str, out: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in {n for s in SETTINGS.values() for n in s}}
    env.update(SETTINGS[setting])
    argv = ["train", "--recipe", recipe, "--out", str(out), "--stop-after", str(steps), "--quiet"]
    code = f"import sys\nfrom rxruntime.cli import main\nsys.exit(main({argv!r}))"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode not in (0, 3):  # 3: stopped after --stop-after steps, as asked
        raise RuntimeError(f"{setting}: rxrt train failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return {"environment": SETTINGS[setting], "seconds": round(time.perf_counter() - start, 1),
            "digest": tensor_digest(out / STATE_FILE), "mkl_cbwr_branch": mkl_branch(env)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--recipe", default="smol-ci")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS))
    parser.add_argument("--compare", type=Path, help="a record of this script made on another machine")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    result: dict[str, Any] = {"recipe": args.recipe, "steps": args.steps, "cpu": cpu_model(),
                              "torch": torch.__version__, "runs": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="isa-pin-") as tmp:
        for setting in settings:
            result["runs"][setting] = run(args.recipe, args.steps, setting, Path(tmp) / setting)
            print(f"{setting:13s} {result['runs'][setting]['digest'][:16]}  {result['runs'][setting]['seconds']} s",
                  flush=True)  # fmt: skip
    digests = {s: r["digest"] for s, r in result["runs"].items()}
    result["same_as_native"] = {s: d == digests.get("native") for s, d in digests.items() if s != "native"}
    print("same tensors as native:", result["same_as_native"])
    if args.compare:
        other = json.loads(args.compare.read_text())
        if (other["recipe"], other["steps"]) != (args.recipe, args.steps):
            parser.error(
                f"{args.compare} is {other['recipe']} at {other['steps']} steps, not {args.recipe} at {args.steps}"
            )
        result["compared_with"] = {"file": str(args.compare), "cpu": other["cpu"], "same": {
            s: r["digest"] == other["runs"].get(s, {}).get("digest") for s, r in result["runs"].items()}}  # fmt: skip
        print(f"same tensors as on {other['cpu']}:", result["compared_with"]["same"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
