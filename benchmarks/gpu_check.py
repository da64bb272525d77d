"""The GPU check, prepared for the day a CUDA machine is lent (issue 27): about 8 minutes at most.

One script, so one call on a lent machine runs everything and brings the figures back:

1. ``setup``: makes ``rxruntime`` importable with what the machine has (PyTorch's image has torch,
   transformers, rich, tokenizers, safetensors, pytest; not reactivex or pyzmq) plus wheels
   carried in ``.whl/`` (``benchmarks/gpu_wheels.sh`` downloads them here, since the machine has
   no network), then an editable install of this tree (``--no-build-isolation``, no index);
2. ``gpu-tests``: ``pytest -m gpu`` (bf16 decoding, CPU and CUDA agreeing, the memory update on
   its own CUDA stream);
3. ``turns``: ``rxrt bench turns`` at alpha-mini on ``cuda`` (20 turns, 3 repeats) against the
   transformers baseline on the same GPU;
4. ``throughput``: ``rxrt bench throughput`` at alpha-mini on ``cuda`` (1, 8, 64, 256
   conversations) through the real engine, whose memory updates run on their own CUDA stream;
5. ``overlap``: ``rxrt bench overlap`` at alpha-mini on ``cuda``: the next query sent at once
   (behind the previous memory update, which runs on its own CUDA stream) against sent after it;
6. ``decode``: ``rxrt bench decode`` at alpha-mini on ``cuda``, batch 1 and batch 64.

Each step has its own time limit (together under 8 minutes); a step that fails or runs out is
recorded and the next one runs. Everything lands in ``--out`` (default ``$OUT``, the device tool's
output folder, else ``benchmarks/results/gpu``): ``gpu-check.json`` (each step's command, exit
code, seconds and output tail; the machine), the JSON and plot of each benchmark, and the tests'
JUnit XML. On the device tool::

    bash benchmarks/gpu_wheels.sh                     # here, once: reactivex, pyzmq, setuptools
    run(command="python3 benchmarks/gpu_check.py", carry=[".whl"], timeout_s=540)

``--dry-run`` checks, without a GPU, that every ``rxrt`` command line parses and that pytest
collects the GPU tests (``tests/test_bench_gpu_check.py`` runs it), and prints the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RXRT = [sys.executable, "-c", "import sys; from rxruntime.cli import main; sys.exit(main())"]
"""``rxrt`` without relying on the console script being on PATH (the machine's python3 is a venv)."""


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: int
    stdout_file: str | None = None
    """Where the step's stdout goes (a JSON report), under the output folder."""


def plan(out: Path, device: str = "cuda", preset: str = "alpha-mini", quick: bool = False) -> list[Step]:
    """The steps in order; ``out`` is where the benchmarks write (their limits and setup's add up
    to 470 s). ``quick``: a few turns and conversations, for a smoke run of the script on a CPU."""
    common = ["--preset", preset, "--device", device]
    turns = ["--turns", "2", "--repeats", "1", "--answer-tokens", "8"] if quick else ["--turns", "20", "--repeats", "3"]
    levels = "1,3" if quick else "1,8,64,256"
    repeats = "1" if quick else "5"
    rows = "4" if quick else "64"
    answer = ["--answer-tokens", "8"] if quick else []
    return [
        Step("gpu-tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-m", "gpu",
                           "tests/test_gpu.py", f"--junitxml={out / 'gpu-tests.xml'}"], 100),
        Step("turns", [*RXRT, "bench", "turns", *common, *turns, "--json", "--out", str(out)], 100),
        Step("throughput", [*RXRT, "bench", "throughput", *common, "--concurrency", levels,
                            "--json", "--out", str(out)], 80),
        Step("overlap", [*RXRT, "bench", "overlap", *common, "--turns", "3" if quick else "10", *answer,
                         "--json", "--out", str(out)], 40),
        Step("decode", [*RXRT, "bench", "decode", *common, "--repeats", repeats, "--json"], 30,
             stdout_file=f"decode-{preset}-{device}.json"),
        Step("decode-b64", [*RXRT, "bench", "decode", *common, "--repeats", repeats, "--batch-size", rows,
                            "--json"], 30, stdout_file=f"decode-{preset}-{device}-b{rows}.json"),
    ]  # fmt: skip


def setup_steps() -> list[Step]:
    """Make ``import rxruntime`` work: carried wheels first (no network there), then this tree."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir"]
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    steps = [Step("setup-wheels", [*pip, *wheels], 45)] if wheels else []
    return [*steps, Step("setup-rxruntime", [*pip, "--no-build-isolation", "-e", str(ROOT)], 45)]


def _tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


def run_step(step: Step, out: Path) -> dict[str, object]:
    """Run one step from the repository root; its record for ``gpu-check.json``."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout_s, env=env)
        code: int | str = proc.returncode
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = f"timed out after {step.timeout_s} s"
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    if step.stdout_file and code == 0:
        (out / step.stdout_file).write_text(stdout)
    seconds = time.perf_counter() - start
    print(f"[{step.name}] exit {code} in {seconds:.0f} s", flush=True)
    return {
        "step": step.name,
        "argv": step.argv,
        "exit": code,
        "seconds": round(seconds, 1),
        "stdout_tail": "" if step.stdout_file or "--json" in step.argv else _tail(stdout),
        "stderr_tail": _tail(stderr),
    }


def machine() -> dict[str, object]:
    """What the figures were measured on (nvidia-smi where present)."""
    info: dict[str, object] = {"python": sys.version.split()[0], "platform": platform.platform()}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["gpus"] = smi.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["gpus"] = f"nvidia-smi: {exc}"
    return info


def dry_run(steps: list[Step]) -> int:
    """Every ``rxrt`` command line through the real parser, and pytest's collection of the GPU tests."""
    from rxruntime.cli import build_parser

    parser = build_parser()
    bad = 0
    for step in steps:
        if step.argv[: len(RXRT)] == RXRT:
            try:
                args = parser.parse_args(step.argv[len(RXRT) :])
            except SystemExit:
                print(f"[{step.name}] does not parse: {' '.join(step.argv[len(RXRT) :])}")
                bad += 1
                continue
            print(f"[{step.name}] parses: rxrt {args.command} {args.bench} ({step.timeout_s} s)")
        else:
            argv = [a for a in step.argv if not a.startswith("--junitxml")] + ["--collect-only"]
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
            collected = [line for line in proc.stdout.splitlines() if "::" in line]
            print(f"[{step.name}] collects {len(collected)} tests ({step.timeout_s} s)")
            if proc.returncode != 0 or not collected:
                print(proc.stdout[-2000:], proc.stderr[-2000:])
                bad += 1
    total = sum(s.timeout_s for s in [*setup_steps(), *steps])
    print(f"limits add up to {total} s")
    return 1 if bad or total > 480 else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    default_out = os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="check the plan without a GPU")
    parser.add_argument("--skip-setup", action="store_true", help="rxruntime is already installed")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only for a smoke run of this script)")
    parser.add_argument("--preset", default="alpha-mini")
    parser.add_argument("--quick", action="store_true", help="a few turns and conversations (smoke run)")
    args = parser.parse_args(argv)
    steps = plan(args.out, args.device, args.preset, args.quick)
    if args.dry_run:
        return dry_run(steps)
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, object]] = []
    report = {"machine": machine(), "device": args.device, "preset": args.preset, "quick": args.quick, "steps": records}
    for step in ([] if args.skip_setup else setup_steps()) + steps:
        records.append(run_step(step, args.out))
        (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
        if step.name.startswith("setup") and records[-1]["exit"] != 0:
            print("setup failed: rxruntime is not importable, nothing else can run", flush=True)
            return 1
    failed = [str(r["step"]) for r in records if r["exit"] != 0]
    print(f"done: {len(records) - len(failed)} steps passed" + (f", FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
