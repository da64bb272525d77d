"""The int8 C step with its multi-row kernel against the row-by-row step and torch, in CPU time.

Prefills (one prompt of each length) and decode steps of several rows, each variant in turn
within every repeat (interleaved), at alpha-mini with int8 weights, one thread: ``multi`` is the
C step as it runs (``native.ROWS_PER_PASS`` rows per pass), ``rowwise`` the C step before the
multi-row kernel (``native.set_rows_per_pass(model, 1)``), ``torch`` the torch paths on the same
rounded weights, ``torch-bf16`` the torch prefill under ``torch.autocast(bfloat16)``.

``--weights fp32`` runs the same variants on float32 weights (the float32 multi-row kernels),
and on an AVX-512 build ``tile256``: the C step with the 256-bit float32 tile (``multi`` runs the
512-bit one; ``native.f32_tile``);
the runtime takes its C prefill for joins of up to ``native.FP32_PREFILL_MAX_TOKENS`` tokens.
``--join K`` prefills K prompts of each length together (a join of K conversations);
``--chunks 64,256`` adds the float32 C prefill in chunks of those many tokens (``chunkN``;
``multi`` runs ``native.FP32_PREFILL_CHUNK``); ``--prefill-variants`` picks the variants to run.

``--attend`` compares instead the C step's vectorised attention (decode_step.c's ``attend``) with
the scalar code it replaced (``RXRT_NATIVE_ATTEND=old``), both in the multi-row int8 step: the same
prefills and decode steps, the two in turn within every repeat, and the ratios old / vector; then
``benchmarks/attend_kernel.c`` (built like the C step) times the attention of one head alone at
the preset's head size (over its memory slots, a decode step's cache at position 40, a 256-token
prefill's mean cache) and at 64 wide, and the softmax's exponentials (vector exp_neg against
libm's expf one score at a time).

Times are the calling thread's CPU time (``time.thread_time``), not wall time: with one thread
every path runs on the calling thread, and on a shared machine CPU time is far less disturbed
by other tenants than wall time (it still counts their cache misses). ``--threads 2`` runs torch
and the C step on two threads, as the engine does, and times wall time instead (torch's products
and the C step scale differently: a float32 join of 16 x 32 tokens is faster in torch on one
thread and in C on two). Writes JSON to ``--out``.

    python benchmarks/int8_rows.py --repeats 3 --out benchmarks/results/multirow/int8-rows-cpu-time.json
    python benchmarks/int8_rows.py --attend --out benchmarks/results/multirow/attend-cpu-time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rxruntime.models import RxTModel, load_pretrained, native, preset
from rxruntime.models.cache import KVCache
from rxruntime.models.weight_format import set_weight_format

Buffers = tuple[list[tuple[torch.Tensor, torch.Tensor]], KVCache]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _attend_kernel(shapes: list[tuple[int, int]]) -> list[dict[str, object]]:
    """``benchmarks/attend_kernel.c`` built once with the C step's default flags, run per
    (head dim, keys)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or "gcc"
    source = Path(__file__).with_name("attend_kernel.c")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "attend_kernel"
        command = [compiler, "-O3", "-march=native", "-fopenmp", "-std=c11", str(source), "-o", str(binary), "-lm"]
        subprocess.run(command, check=True)
        for head_dim, keys in shapes:
            calls = max(2000, 5_000_000 // (keys * head_dim))
            done = subprocess.run([str(binary), str(head_dim), str(keys), str(calls)], check=True, capture_output=True)
            rows.append(json.loads(done.stdout))
            print("attend kernel:", rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--preset", default="alpha-mini")
    parser.add_argument("--checkpoint", help="a model directory (e.g. an RxLM checkpoint) instead of --preset")
    parser.add_argument("--weights", default="int8", choices=["int8", "fp32"], help="the C step's weight format")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", default="35,128,256", help="prefill lengths, comma-separated")
    parser.add_argument("--rows", default="1,8,16,64", help="decode rows, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per repeat")
    parser.add_argument("--attend", action="store_true", help="vector attention against the old scalar one")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and C-step threads; above 1 the times are wall times"
    )
    parser.add_argument("--prefill-variants", default="", help="comma-separated: only these prefill variants")
    parser.add_argument("--decode-variants", default="", help="comma-separated: only these decode variants")
    parser.add_argument("--join", type=int, default=1, help="prompts per prefill, each of the --prompts length")
    parser.add_argument(
        "--chunks", default="", help="float32: also the C prefill in chunks of these many tokens (e.g. 64,256)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print("CPU:", _cpu_model(), flush=True)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    if args.checkpoint:  # real weights: their routing is not a random model's
        model = load_pretrained(args.checkpoint, load_tokenizer=False)[0]
        native.prepare(model)
    else:
        model = RxTModel(preset(args.preset)).eval()
    set_weight_format(model, args.weights)
    model.use_decode_layout()
    vocab = model.config.vocab_size

    def buffers(rows: int) -> Buffers:
        stm = model.init_stm(rows, torch.Generator().manual_seed(3))
        with torch.inference_mode():
            kv = [(k.contiguous(), v.contiguous()) for k, v in model.memory_kv(stm)]
        return kv, model.new_cache(rows)

    def use(variant: str) -> None:
        """``vector`` and ``old`` are the multi-row C step with either attention; ``tile256`` the
        multi-row C step with the 256-bit float32 tile."""
        os.environ["RXRT_NATIVE_ATTEND"] = "old" if variant == "old" else "vector"
        native.f32_tile(256 if variant == "tile256" else widest)
        native.set_rows_per_pass(model, 1 if variant == "rowwise" else None)

    def prefill(prompts: list[list[int]], variant: str) -> float:
        kv, cache = buffers(len(prompts))
        chunk = variant.startswith("chunk")
        use("multi" if chunk else variant)
        model.native_decode = chunk or variant in ("multi", "rowwise", "vector", "old", "tile256")
        ids, lengths = torch.tensor(prompts), torch.tensor([len(p) for p in prompts])
        if chunk:
            native.FP32_PREFILL_CHUNK = int(variant.removeprefix("chunk"))
        start = clock()
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=variant == "torch-bf16"):
            if model.native_decode:
                assert native.prefill(model, prompts, kv, cache) is not None
            else:
                model.prefill(ids, lengths, kv, cache)
        native.FP32_PREFILL_CHUNK = default_chunk
        return clock() - start

    def decode(rows: int, variant: str) -> float:
        kv, cache = buffers(rows)
        use(variant)
        model.native_decode = variant != "torch"
        tokens, positions = torch.randint(7, vocab, (rows,)), torch.full((rows,), 40)
        step: Callable[[], object]
        if model.native_decode:
            decoder = native._decoder_for(model)
            assert decoder is not None
            step = lambda: decoder.step(tokens, positions, kv, cache)  # noqa: E731
        else:
            step = lambda: model.decode_step(tokens, positions, kv, cache)  # noqa: E731
        with torch.inference_mode():
            step()
            start = clock()
            for _ in range(args.steps):
                step()
        return float(rows * args.steps / (clock() - start))

    limit = native.MULTI_ROW_MAX_ROWS
    native.MULTI_ROW_MAX_ROWS = native.MAX_ROWS = max(int(r) for r in args.rows.split(","))  # the C step at every size
    gen = torch.Generator().manual_seed(1)
    result: dict[str, object] = {"prefill_ms": {}, "decode_tokens_per_s": {}}
    default_chunk = native.FP32_PREFILL_CHUNK
    prefill_variants = ["vector", "old"] if args.attend else ["multi", "rowwise", "torch", "torch-bf16"]
    widest = native.f32_tile()
    tiles = ["tile256"] if args.weights == "fp32" and widest == 512 else []
    if args.weights == "fp32":
        prefill_variants += tiles + [f"chunk{int(c)}" for c in args.chunks.split(",") if c]
    if args.prefill_variants:
        prefill_variants = [v for v in prefill_variants if v in args.prefill_variants.split(",")]
    decode_variants = ["vector", "old"] if args.attend else ["multi", *tiles, "rowwise", "torch"]
    if args.decode_variants:
        decode_variants = [v for v in decode_variants if v in args.decode_variants.split(",")]
    for length in (int(n) for n in args.prompts.split(",") if n):
        prompts = torch.randint(7, vocab, (args.join, length), generator=gen).tolist()
        times: dict[str, list[float]] = {k: [] for k in prefill_variants}
        for _ in range(args.repeats):
            for variant in times:
                times[variant].append(prefill(prompts, variant))
        row = {k: round(1000 * statistics.median(v), 1) for k, v in times.items()}
        if args.attend:
            row["old_over_vector"] = round(statistics.median(times["old"]) / statistics.median(times["vector"]), 2)
        result["prefill_ms"][str(length)] = row  # type: ignore[index]
        print(f"prefill {args.join} x {length} tokens, ms:", row, flush=True)
    for rows in (int(n) for n in args.rows.split(",")):
        rates: dict[str, list[float]] = {k: [] for k in decode_variants}
        for _ in range(args.repeats):
            for variant in rates:
                rates[variant].append(decode(rows, variant))
        row = {k: round(statistics.median(v), 1) for k, v in rates.items()}
        if args.attend:
            row["vector_over_old"] = round(statistics.median(rates["vector"]) / statistics.median(rates["old"]), 2)
        result["decode_tokens_per_s"][str(rows)] = row  # type: ignore[index]
        print(f"decode {rows} rows, tokens/s:", row, flush=True)
    native.MULTI_ROW_MAX_ROWS, native.MAX_ROWS = limit, 16
    os.environ.pop("RXRT_NATIVE_ATTEND", None)
    if args.attend:
        hd = model.config.dim // model.config.decoder.num_heads
        # the memory; a decode step's cache at position 40; a 256-token prefill's mean cache; a 64-wide head
        shapes = [(hd, model.config.stm_size), (hd, 41), (hd, 128), (64, model.config.stm_size)]
        result["attend_kernel"] = _attend_kernel(shapes)
    result["config"] = {
        **vars(args),
        "out": str(args.out) if args.out else None,
        "threads": args.threads,
        "time": "thread CPU time" if args.threads == 1 else "wall time",
        "rows_per_pass": native.ROWS_PER_PASS,
        "decode_position": 40,
        "isa": native.isa(),
        "f32_tile": widest,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_end": list(os.getloadavg()),
        "torch": torch.__version__,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
