"""RxT-Beta at its published size, measured on this CPU, with RxLM's own ``interact`` beside it.

Issue 23: every figure in docs/ was for models of at most 141M parameters with a 3 MiB memory.
This script builds a random-weight checkpoint with exactly RxT-Beta-Supervised's published
options (2.96B tensors in the file, bf16 safetensors, about 5.9 GB; never committed, reused when
present) and measures, each side in its own process, one after the other (never two full-size
models in memory at once):

* rxruntime (``ours``): load time and resident memory; a 300-token system prompt read into memory
  (``memory_init``, RxTBeta's template); time to first token of a 200-token query; decode tokens/s
  at 1 and 8 conversations; the memory update's time; STM bytes per conversation (float32 and
  bf16, and the resident memory each idle conversation adds); store write and read time per turn
  with SQLite (a file) and Redis (a real ``redis-server``), float32 and bf16; conversations per
  GiB of RAM.
* RxLM (``--rxlm PYTHON``, an RxLM 0.3 environment): benchmarks/rxlm_env/rxlm_beta_full.py loads
  the same file in bf16 and runs the same system prompt and query through ``init_stm_state`` and
  ``interact`` (and ``batch_interact`` at 8).

Memory safety (a shared machine): the full-size run refuses to start with less than
``--min-available-gib`` of ``MemAvailable``, the checkpoint is written tensor by tensor (one
chunk of at most 64 MB in memory), and each measuring process stops itself if ``MemAvailable``
falls under ``--guard-gib``::

    python benchmarks/beta_full_size.py --rxlm /work/rxlm-0.3.93-venv/bin/python \\
        --out ~/.cache/rxruntime/beta-full --json benchmarks/results/beta-full-size.json

``--config FILE --spec FILE`` runs the same code paths on another configuration, the tensor list
taken from a checkpoint RxLM wrote for it (its safetensors header) or from rxlm_beta_full.py
``spec``: the test suite runs it on the small ``beta_published_fast`` fixture (Beta's shape
options, written by RxLM 0.3.93), so that the script cannot rot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RXLM_SIDE = HERE / "rxlm_env" / "rxlm_beta_full.py"
BETA_SPEC = HERE / "rxt_beta_tensors.json"  # rxlm_beta_full.py spec, RxLM 0.3.93, the config below
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[Q]", "[A]", "[T]", "[C]", "[U]", "[I]"]
CHUNK = 16 * 2**20  # values generated at once while writing (64 MB of float32)
GIB = 2**30


def published_config() -> dict[str, Any]:
    """RxT-Beta-Supervised's ``config.json`` with the options issue 23 lists (the memory
    attention's head groups are not listed: SQA 8/8 of 16 here); RxLM's defaults fill the rest.
    ``use_flash_attention`` is off: a kernel choice that RxLM cannot make on a CPU and that
    changes no number."""
    shared = dict(embed_dim=512, att_heads=16, seq_len=8192, stm_size=4096, rope_base=100000, num_layers=21)
    component = dict(shared, vocab_size=65536, use_gated=True, ff_activation="silu", use_rms_norm=True)
    decoder = dict(
        component,
        ff_dim=192,
        use_moe=True,
        num_experts=384,
        moe_top_k=10,
        num_shared_experts=2,
        shared_expert_dim=384,
        moe_bias_mode="global",
        moe_shared_experts_bias_mode="global",
        self_att_type="sqa",
        cross_att_type="sqa",
        att_query_groups=8,
        att_groups=4,
        cross_att_query_groups=8,
        cross_att_groups=4,
        stateless_layers_config=["dense", "moe"],
        final_stateless_layers_config=["moe", "moe"],
        dense_layer_dim=1536,
        use_gated_attention=True,
        use_gated_cross_attention=False,
        use_attention_output_bias=False,
        use_head_norm=True,
        head_norm_type="rms_norm",
        router_amp=True,
        router_dtype="bfloat16",
        use_flash_attention=False,
    )
    encoder = dict(
        component,
        ff_dim=1536,
        self_att_type="sqa",
        att_query_groups=8,
        att_groups=8,
        use_gated_attention=True,
        skip_memory_cross_attention=True,
        use_flash_attention=False,
    )
    memory = dict(
        shared,
        num_groups=3,
        att_type="sqa",
        att_query_groups=8,
        att_groups=8,
        interlayer_att_type="sqa",
        interlayer_att_query_groups=8,
        interlayer_att_groups=8,
        norm_type="classic-rms",
        use_gated_residual=True,
        residual_gate_type="elementwise",
        residual_per_slot_gate=True,
        use_tanh_residual_gate=False,
        use_flash_attention=False,
    )
    special = dict(bos_token_id=2, eos_token_id=3, query_token_id=4, answer_token_id=5, pad_token_id=0)
    special.update(think_token_id=6, tool_call_token_id=7, tool_use_token_id=8, internal_token_id=9)
    return dict(
        decoder_config=decoder,
        encoder_config=encoder,
        memory_attention_config=memory,
        memory_attention_variant="grouped-self-interlayer",
        tokenizer_config=special,
        system_prompt_title="SYSTEM INSTRUCTIONS",
    )


# ---------------------------------------------------------------------- the checkpoint
def read_spec(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape), from a safetensors file's header or a spec JSON."""
    if path.suffix == ".safetensors":
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        aliases = header.get("__metadata__") or {}  # tensors RxLM saved once for several names
        entries.update({alias: entries[name] for alias, name in aliases.items() if name in entries})
    else:
        entries = json.loads(path.read_text())["tensors"]
    return {name: (str(v["dtype"]), list(v["shape"])) for name, v in sorted(entries.items())}


def stored_dtype(name: str) -> str:
    """bf16 for every weight; RoPE tables stay float32 as RxLM keeps them."""
    return "F32" if ".rope." in name else "BF16"


def tensor_values(name: str, shape: list[int], config: dict[str, Any], gen: torch.Generator) -> Iterator[torch.Tensor]:
    """The values of one tensor in float32 chunks along its first axis: norms 1, biases 0 ([EOS]'s
    LM-head bias -30, so greedy answers run to the length asked), gates 0, RoPE as RxLM computes
    it, the rest normal with std 0.02 (the STM buffers std 1)."""
    if ".rope." in name:
        half = shape[-1]
        inv_freq = 1.0 / (config["decoder_config"]["rope_base"] ** (torch.arange(0, 2 * half, 2).float() / (2 * half)))
        yield inv_freq if name.endswith("inv_freq") else torch.outer(torch.arange(shape[0]).float(), inv_freq)
        return
    numel = math.prod(shape)
    row = numel // shape[0] if shape and shape[0] else 1
    rows = max(1, CHUNK // max(row, 1))
    leaf = name.rsplit(".", 1)[-1]
    is_norm = "norm" in name and leaf == "weight" and len(shape) == 1
    is_bias = leaf in ("bias", "global_bias", "shared_experts_bias") or leaf.startswith("b")
    for start in range(0, shape[0] if shape else 1, rows):
        count = min(rows, shape[0] - start) if shape else 1
        part_shape = [count, *shape[1:]] if shape else []
        if is_norm:
            part = torch.ones(part_shape)
        elif is_bias or (leaf == "gate" and "gate_layers" in name):
            part = torch.zeros(part_shape)
            if name == "decoder.model.head.bias":
                eos = config["tokenizer_config"]["eos_token_id"]
                if start <= eos < start + count:
                    part[eos - start] = -30.0
        else:
            std = 1.0 if name.endswith("stm.memory") else 0.02
            part = torch.randn(part_shape, generator=gen) * std
        yield part


def _bytes(t: torch.Tensor, dtype: str) -> bytes:
    if dtype == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return t.to(torch.float32).numpy().tobytes()


def word_tokenizer_json(vocab: int, path: Path) -> None:
    """A word-level ``tokenizer.json`` with Beta's special tokens and one word per other id
    (``t10`` ...), so that a text of n words is n tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    words.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(path))


def write_checkpoint(
    directory: Path, config: dict[str, Any], spec: dict[str, tuple[str, list[int]]], seed: int = 0
) -> dict[str, Any]:
    """Write ``config.json``, ``tokenizer.json`` and ``model.safetensors`` (streamed, tensor by
    tensor); reuse a complete earlier one written from the same config, spec and seed."""
    key = hashlib.sha256(json.dumps([config, spec, seed], sort_keys=True).encode()).hexdigest()[:16]
    weights = directory / "model.safetensors"
    marker = directory / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key and weights.is_file():
        return {"reused": True, "bytes": weights.stat().st_size, "write_s": None}
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (_, shape) in spec.items():
        dtype = stored_dtype(name)
        size = math.prod(shape) * (2 if dtype == "BF16" else 4)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    partial = weights.with_suffix(".partial")
    gen = torch.Generator().manual_seed(seed)
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, (_, shape) in spec.items():
            for part in tensor_values(name, shape, config, gen):
                f.write(_bytes(part, stored_dtype(name)))
    partial.replace(weights)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    word_tokenizer_json(config["decoder_config"]["vocab_size"], directory / "tokenizer.json")
    marker.write_text(json.dumps({"key": key}))
    return {"reused": False, "bytes": weights.stat().st_size, "write_s": time.perf_counter() - start}


# ---------------------------------------------------------------------- machine facts
def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def rss() -> tuple[int, int]:
    """(resident now, peak resident) of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def guard(min_available: int) -> None:
    """Stop this process at once if the machine runs short of memory (others' jobs come first)."""

    def watch() -> None:
        while True:
            available = meminfo()["MemAvailable"]
            if available < min_available:
                print(f"MemAvailable {available / GIB:.1f} GiB < guard: stopping", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------------- rxruntime's side
def progress(stage: str, data: Any) -> None:
    """A line on stderr per stage (the full-size run takes many minutes), with the resident memory."""
    now, peak = rss()
    print(
        f"[{time.strftime('%H:%M:%S')}] {stage}: rss {now / GIB:.2f} GiB (peak {peak / GIB:.2f}) {data}",
        file=sys.stderr,
        flush=True,
    )


def words(start: int, count: int, vocab: int) -> str:
    return " ".join(f"t{len(SPECIAL_TOKENS) + (start + i) % (vocab - len(SPECIAL_TOKENS))}" for i in range(count))


def query_ids(index: int, count: int, vocab: int) -> list[int]:
    low = len(SPECIAL_TOKENS)
    return [low + (7919 * index + 104729 * i) % (vocab - low) for i in range(count)]


def _turn(conv: Any, query: list[int], answer_tokens: int) -> dict[str, Any]:
    """One turn through the event stream: the answer's timings, then its memory update's."""
    from reactivex import operators as ops

    from rxruntime.events import AnswerCompleted

    events = conv.interact(query, max_new_tokens=answer_tokens).pipe(ops.to_list()).run()
    done = next(e for e in events if isinstance(e, AnswerCompleted))
    assert conv.wait_for_memory(3600)
    memory = [h for h in conv.history() if "memory_update_s" in h][-1]
    return {
        "ttft_s": done.ttft_s,
        "tokens": len(done.token_ids),
        "tokens_per_s": done.tokens_per_s,
        "duration_s": done.duration_s,
        "memory_update_s": memory["memory_update_s"],
        "first_8_tokens": list(done.token_ids[:8]),
    }


def measure_stores(config: Any, stm: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Write and read one conversation's STM per turn: SQLite (a file) and a real redis-server,
    float32 and bf16; medians of ``repeats``."""
    from benchmarks.harness.redis_server import RedisServer
    from rxruntime.stores import STMStore, open_store, persist

    out: dict[str, Any] = {}

    def run(name: str, store: STMStore) -> None:
        writes, reads = [], []
        for version in range(1, repeats + 1):
            start = time.perf_counter()
            persist(store, config, "beta", version, stm, version)
            writes.append(time.perf_counter() - start)
            start = time.perf_counter()
            got = store.get("beta")
            reads.append(time.perf_counter() - start)
            assert got is not None and got.stm_version == version
        assert got is not None
        size = len(got.to_bytes())
        store.delete("beta")
        store.close()
        out[name] = {"write_s": statistics.median(writes), "read_s": statistics.median(reads), "bytes": size}

    with tempfile.TemporaryDirectory(prefix="rxrt-beta-store-") as tmp:
        for dtype in ("float32", "bfloat16"):
            run(f"sqlite-{dtype}", open_store(f"sqlite:///{tmp}/stm-{dtype}.db?stm_dtype={dtype}"))
    with RedisServer() as redis:
        for dtype in ("float32", "bfloat16"):
            run(f"redis-{dtype}", open_store(f"{redis.url}?stm_dtype={dtype}"))
    return out


def decode_bytes_per_token(model: Any, weights: str) -> dict[str, float]:
    """What one batch-1 decode step must read at least, by part: every decoder matrix it uses
    once (int8: q8_0 values plus a float32 scale per 32; the experts' share is top-k of E), the
    router, and the memory keys/values of each memory layer (bf16 compact copies beside int8/bf16
    weights, as the C step reads them; each key/value head once). Memory bandwidth over the total
    is the decode rate's ceiling."""
    from torch import nn

    from rxruntime.models.moe import MoE

    per = {"int8": 1.125, "bf16": 2.0, "fp32": 4.0}[weights]
    kv_bytes = 4 if weights == "fp32" else 2
    out = {"matrices": 0.0, "experts": 0.0, "router": 0.0, "memory_kv": 0.0}
    stm = model.config.stm_size
    for name, mod in model.decoder.named_modules():
        if isinstance(mod, nn.Linear):
            if name.endswith("router"):
                out["router"] += mod.weight.numel() * (2 if model.config.decoder.router_dtype == "bfloat16" else 4)
            elif ".cross_attn.k_proj" in f".{name}" or ".cross_attn.v_proj" in f".{name}":
                out["memory_kv"] += stm * mod.out_features * kv_bytes  # computed once a turn, read per token
            else:
                out["matrices"] += mod.weight.numel() * per
        elif isinstance(mod, MoE):
            out["experts"] += mod.top_k * mod.expert_numel() * per  # released or not
    out["total"] = sum(out.values())
    return out


def read_bandwidth(threads: int, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second a ``threads``-thread ``torch.sum`` streams from a buffer far larger than
    the caches (best of ``repeats``): the bandwidth a decode step's weight reads can reach."""
    torch.set_num_threads(threads)
    buf = torch.ones(megabytes * 2**20 // 4)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best


def measure_ours(args: argparse.Namespace) -> dict[str, Any]:
    import rxruntime
    from rxruntime.models import native
    from rxruntime.models.moe import MoE

    guard(int(args.guard_gib * GIB))
    torch.set_num_threads(args.threads)
    # int8: float32 parameters with q8_0 copies of the matrices, the C step (what rxruntime.load gives
    # a float32 model on a CPU); bf16: the torch step on bf16 parameters
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.float32}[args.dtype]
    bandwidth = read_bandwidth(args.threads)  # before the model takes the memory
    rss_before = rss()[0]
    start = time.perf_counter()
    # what `rxrt chat` and `rxrt serve` run: rxruntime.load (int8: the routed experts compacted one
    # MoE at a time as they are read, the C step's copies made, the float32 tables never all held);
    # memory updates --memory-batch at a time: their activations grow with the batch (slots^2 attention)
    engine = rxruntime.load(
        args.out,
        device="cpu",
        dtype=dtype,
        weights="int8" if args.dtype == "int8" else None,
        max_batch=max(8, args.batch),
        max_memory_batch=args.memory_batch,
        keep_float32=args.keep_float32,
    )
    load_s = time.perf_counter() - start
    model = engine.model
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    released = sum(m.released_numel() for m in moes) * 4  # float32 tables never held (or dropped)
    parameters = sum(p.numel() for p in model.parameters()) + released // 4
    per_token = decode_bytes_per_token(model, args.dtype)
    rss_loaded, peak_load = rss()
    config = engine.config
    vocab = config.vocab_size
    result: dict[str, Any] = {
        "load_s": load_s,
        "released_float32_bytes": released,
        "rss_bytes": rss_loaded,
        "rss_model_bytes": rss_loaded - rss_before,
        "peak_rss_load_bytes": peak_load,
        "dtype": str(dtype),
        "parameters": parameters,
        # the C step runs a CPU float32 model whose layout it covers, where it builds
        "c_decode_step": dtype == torch.float32 and native.enabled() and native.layout_reason(engine.model) is None,
        "weights": args.dtype,
        "decode_bytes_per_token": per_token,
        "read_bandwidth_bytes_per_s": bandwidth,
    }
    shown = ("load_s", "released_float32_bytes", "rss_bytes", "peak_rss_load_bytes")
    progress("loaded", {k: result[k] for k in shown})
    with engine:
        # A warm-up turn, apart, so the turns below measure steady state: its first token (what
        # one-time setup is left after the load: buffers bound, tables built) and then its memory
        # update, timed apart (``first_turn_setup_s``, kept for older results, is both)
        start = time.perf_counter()
        warm = engine.conversation("warm-up")
        warm.ask(query_ids(10_000, 4, config.vocab_size), max_new_tokens=1, timeout=3600)
        result["first_ask_s"] = time.perf_counter() - start
        assert warm.wait_for_memory(3600)
        warm.close()
        result["first_turn_setup_s"] = time.perf_counter() - start
        result["first_memory_update_s"] = result["first_turn_setup_s"] - result["first_ask_s"]
        progress("first turn", {k: result[k] for k in ("first_ask_s", "first_memory_update_s")})
        system_text = words(0, args.system_tokens, vocab)
        system_ids = engine.tokenizer.system_ids(system_text)
        start = time.perf_counter()
        conv = engine.conversation("beta-0", memory_init=system_text)
        assert conv.wait_for_memory(3600)
        result["system_prompt"] = {"ids": len(system_ids), "memory_init_s": time.perf_counter() - start}
        progress("system prompt read", result["system_prompt"])
        first_query = query_ids(0, args.query_tokens, vocab)
        result["b1"] = _turn(conv, first_query, args.answer_tokens)
        progress("one conversation", result["b1"])
        stm = conv.export_state().stm

        # b conversations at once: the same system prompt's memory, one short query each
        convs = [engine.conversation(f"beta-b{i}", state=None, stm=stm) for i in range(args.batch)]
        queries = [query_ids(i + 1, args.batch_query_tokens, vocab) for i in range(args.batch)]
        result[f"b{args.batch}"] = _batch_turn(convs, queries, args.answer_tokens)
        result[f"b{args.batch}"]["rss_bytes"] = rss()[0]  # the conversations still open
        progress(f"{args.batch} conversations", result[f"b{args.batch}"])
        for c in convs:
            c.close()
        del convs

        layers, slots, dim = config.num_layers, config.stm_size, config.dim
        values = layers * slots * dim
        idle = []
        before = rss()[0]
        for i in range(args.idle_conversations):
            idle.append(engine.conversation(f"idle-{i}", stm=stm.clone()))
        grown = rss()[0] - before
        result["stm"] = {
            "shape": [layers, slots, dim],
            "float32_bytes": values * 4,
            "bfloat16_bytes": values * 2,
            "engine_dtype_bytes": values * torch.empty((), dtype=dtype).element_size(),
            "idle_conversations": args.idle_conversations,
            "rss_per_idle_conversation_bytes": grown / max(1, args.idle_conversations),
        }
        per = result["stm"]["engine_dtype_bytes"]
        result["conversations_per_gib"] = {
            "resident_stm": GIB / per,
            "measured_rss": GIB / max(1.0, result["stm"]["rss_per_idle_conversation_bytes"]),
            "redis_bf16": GIB / (values * 2),
            "redis_float32": GIB / (values * 4),
        }
        for c in idle:
            c.close()
        del idle
        from safetensors.torch import save_file

        save_file({"stm": stm.float().contiguous()}, str(args.stm_file))  # the stores are timed after we exit
        result["system_ids"] = system_ids
        result["queries"] = [first_query, *queries]
    result["peak_rss_bytes"] = rss()[1]
    return result


def _batch_turn(convs: list[Any], queries: list[list[int]], answer_tokens: int) -> dict[str, Any]:
    """One turn of every conversation at once (the engine batches their decode steps)."""
    from reactivex import operators as ops

    from rxruntime.events import AnswerCompleted

    results: list[Any] = [None] * len(convs)
    start = time.perf_counter()

    def one(i: int) -> None:
        events = convs[i].interact(queries[i], max_new_tokens=answer_tokens).pipe(ops.to_list()).run()
        results[i] = next(e for e in events if isinstance(e, AnswerCompleted))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in convs:
        assert c.wait_for_memory(3600)
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "conversations": len(convs),
        "tokens": tokens,
        "decode_tokens_per_s": sum(r.tokens_per_s for r in results),
        "wall_tokens_per_s": tokens / wall,
        "ttft_s_median": statistics.median(r.ttft_s for r in results),
        "memory_update_s": statistics.median(
            [h for h in c.history() if "memory_update_s" in h][-1]["memory_update_s"] for c in convs
        ),
    }


# ---------------------------------------------------------------------- RxLM's side
def measure_rxlm(args: argparse.Namespace, ids: dict[str, Any], log: Path) -> dict[str, Any]:
    """RxLM in its own environment and process, after ours has exited."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"system": ids["system_ids"], "queries": ids["queries"]}, f)
    cmd = [args.rxlm, str(RXLM_SIDE), "measure", str(args.out), "--ids", f.name]
    batch = args.batch if args.rxlm_batch is None else args.rxlm_batch
    cmd += ["--answer-tokens", str(args.answer_tokens), "--batch", str(batch), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH="")
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=HERE.parent)
        peak = _watch_child(proc, int(args.guard_gib * GIB))
        out, _ = proc.communicate()
    Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = log.read_text()[-1500:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    result: dict[str, Any] = json.loads(line)
    result["watched_peak_rss_bytes"] = peak
    return result


def _watch_child(proc: subprocess.Popen[str], min_available: int) -> int:
    """Kill the child if the machine runs short of memory; its peak resident memory."""
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")

    def watch() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                text = status.read_text()
                peak = max(peak, int(text.split("VmHWM:")[1].split()[0]) * 1024)
            except (OSError, IndexError):
                pass
            if meminfo()["MemAvailable"] < min_available:
                print("MemAvailable under the guard: stopping RxLM's process", file=sys.stderr, flush=True)
                proc.kill()
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc.wait()
    watcher.join()
    return peak


# ---------------------------------------------------------------------- report
def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(result: dict[str, Any]) -> str:
    ours, theirs = result["rxruntime"], result.get("rxlm") or {}
    b = f"b{result['settings']['batch']}"
    rows = [
        ("load, C step copies included (s)", ours["load_s"], theirs.get("load", {}).get("load_s")),
        ("first turn's first token (s)", ours.get("first_ask_s"), None),
        ("resident after load (GiB)", ours["rss_bytes"] / GIB, (theirs.get("load", {}).get("rss_bytes") or 0) / GIB),
        ("peak resident (GiB)", ours["peak_rss_bytes"] / GIB, (theirs.get("watched_peak_rss_bytes") or 0) / GIB),
        ("system prompt into memory (s)", ours["system_prompt"]["memory_init_s"], theirs.get("system_prompt_s")),
        ("TTFT, 200-token query (s)", ours["b1"]["ttft_s"], theirs.get("b1", {}).get("ttft_s")),
        ("decode tok/s, 1 conversation", ours["b1"]["tokens_per_s"], theirs.get("b1", {}).get("tokens_per_s")),
        (f"decode tok/s, {b[1:]} conversations", ours[b]["decode_tokens_per_s"], theirs.get(b, {}).get("tokens_per_s")),
        ("memory update (s)", ours["b1"]["memory_update_s"], theirs.get("b1", {}).get("memory_update_s")),
    ]
    lines = [
        f"RxT-Beta, {result['settings']['config']} config "
        f"({result['checkpoint']['tensors_in_file'] / 1e9:.2f}B tensors, "
        f"{result['checkpoint']['bytes'] / 1e9:.2f} GB bf16) on {result['machine']['cpu']}, "
        f"{result['settings']['threads']} threads, rxruntime {ours['dtype']} vs RxLM {theirs.get('rxlm', '-')}",
        f"{'':34} {'rxruntime':>10} {'RxLM':>10} {'ratio':>8}  (ratio: times faster / smaller in rxruntime)",
    ]
    for label, a, c in rows:
        a_s = f"{a:10.3f}" if a is not None else f"{'-':>10}"
        c_s = f"{c:10.3f}" if c else f"{'-':>10}"
        better_high = "tok/s" in label
        ratio = _ratio(a, c) if better_high else _ratio(c, a)
        lines.append(f"{label:34} {a_s} {c_s} {ratio:>8}")
    need = ours.get("decode_bytes_per_token")
    if need:
        rate, bw = ours["b1"]["tokens_per_s"], ours["read_bandwidth_bytes_per_s"]
        lines.append(
            f"decode, 1 conversation ({ours.get('weights', ours['dtype'])}): {rate:.2f} tokens/s x "
            f"{need['total'] / 1e6:.1f} MB read per token = {rate * need['total'] / 1e9:.2f} GB/s, "
            f"{rate * need['total'] / bw:.0%} of the {bw / 1e9:.1f} GB/s a {result['settings']['threads']}-thread "
            f"sum streams (ceiling {bw / need['total']:.1f} tokens/s)"
        )
    stm = ours["stm"]
    lines.append(
        f"STM per conversation: {stm['float32_bytes'] / 1e6:.1f} MB float32, "
        f"{stm['bfloat16_bytes'] / 1e6:.1f} MB bf16; "
        f"resident per idle conversation {stm['rss_per_idle_conversation_bytes'] / 1e6:.1f} MB; "
        f"{ours['conversations_per_gib']['resident_stm']:.1f} conversations per GiB"
    )
    for name, s in ours["stores"].items():
        lines.append(
            f"store {name:16} write {s['write_s'] * 1e3:8.1f} ms  read {s['read_s'] * 1e3:8.1f} ms  "
            f"{s['bytes'] / 1e6:.1f} MB"
        )
    if "error" in theirs:
        lines.append(f"RxLM: {theirs['error'][:300]}")
    elif isinstance(theirs.get(b), dict) and "error" in theirs[b]:
        lines.append(f"RxLM batch_interact: {theirs[b]['error'][:300]}")
    return "\n".join(lines)


def stores_only(args: argparse.Namespace) -> int:
    """The stores' part alone: what a turn's write and read cost depends on the STM's bytes only."""
    from rxruntime.models.checkpoint import load_config

    if args.config is not None:
        config = load_config(args.config.parent)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(published_config()))
            config = load_config(Path(tmp))
    stm = torch.randn(config.num_layers, config.stm_size, config.dim, generator=torch.Generator().manual_seed(0))
    stores = measure_stores(config, stm, args.store_repeats)
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "stm_shape": list(stm.shape),
        "stores": stores,
    }
    for name, st in stores.items():
        print(
            f"store {name:16} write {st['write_s'] * 1e3:8.1f} ms  read {st['read_s'] * 1e3:8.1f} ms  "
            f"{st['bytes'] / 1e6:.1f} MB"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "rxruntime" / "beta-full")
    parser.add_argument("--json", type=Path, help="write the result here (e.g. benchmarks/results/...)")
    parser.add_argument("--rxlm", help="python of an RxLM 0.3 environment, for RxLM's side")
    parser.add_argument(
        "--rxlm-batch",
        type=int,
        help="RxLM's batch_interact turn: conversations (default: --batch; 0 skips it, RxLM's single turn only)",
    )
    parser.add_argument("--config", type=Path, help="an RxLM config.json (default: RxT-Beta's published options)")
    parser.add_argument("--spec", type=Path, help=f"its tensors (default {BETA_SPEC.name}): JSON or a checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp32", "int8"],
        default="bf16",
        help="rxruntime's side: bf16 (torch step), fp32, or int8 (float32 with q8_0 matrices: the C step)",
    )
    parser.add_argument("--system-tokens", type=int, default=300)
    parser.add_argument("--query-tokens", type=int, default=200)
    parser.add_argument("--batch-query-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--keep-float32",
        action="store_true",
        help="keep the float32 expert tables beside the C step's copies (rxruntime.load(keep_float32=True))",
    )
    parser.add_argument("--idle-conversations", type=int, default=4)
    parser.add_argument("--store-repeats", type=int, default=3)
    parser.add_argument("--memory-batch", type=int, default=2, help="memory updates computed together")
    parser.add_argument("--min-available-gib", type=float, default=14.0)
    parser.add_argument("--guard-gib", type=float, default=2.5)
    parser.add_argument("--side", choices=["all", "ours"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--stm-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--stores-only",
        action="store_true",
        help="time the stores alone with a random STM of the config's shape (no model loaded: ~1 GB)",
    )
    args = parser.parse_args(argv)
    if str(HERE.parent) not in sys.path:  # run as a script: benchmarks.harness from the checkout
        sys.path.insert(0, str(HERE.parent))

    if args.side == "ours":  # the child: measure, print JSON
        print("RESULT " + json.dumps(measure_ours(args)), flush=True)
        return 0

    if args.stores_only:
        return stores_only(args)
    available = meminfo()["MemAvailable"]
    if available < args.min_available_gib * GIB:
        print(
            f"MemAvailable is {available / GIB:.1f} GiB, under --min-available-gib {args.min_available_gib}: not run",
            file=sys.stderr,
        )
        return 2
    if (args.config is None) != (args.spec is None):
        raise SystemExit("--config and --spec go together (a config and the tensors RxLM has for it)")
    config = json.loads(args.config.read_text()) if args.config else published_config()
    spec = read_spec(args.spec or BETA_SPEC)
    written = write_checkpoint(args.out, config, spec)
    stm_file = Path(tempfile.gettempdir()) / f"rxrt-beta-stm-{os.getpid()}.safetensors"
    child = [sys.executable, str(Path(__file__).resolve()), "--side", "ours", "--stm-file", str(stm_file)]
    for key in ("out", "threads", "dtype", "system_tokens", "query_tokens", "batch_query_tokens", "answer_tokens"):
        child += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key in ("batch", "idle_conversations", "store_repeats", "guard_gib", "memory_batch"):
        child += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.keep_float32:
        child.append("--keep-float32")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    proc = subprocess.run(child, stdout=subprocess.PIPE, text=True, env=env, cwd=HERE.parent)  # stderr: ours
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return proc.returncode or 1
    ours = json.loads(lines[-1].removeprefix("RESULT "))
    from safetensors.torch import load_file

    from rxruntime.models.checkpoint import load_config

    stm = load_file(str(stm_file))["stm"]
    stm_file.unlink()
    ours["stores"] = measure_stores(load_config(args.out), stm, args.store_repeats)  # no model in this process
    del stm
    ids = {"system_ids": ours.pop("system_ids"), "queries": ours.pop("queries")}
    rxlm: dict[str, Any] | None = None
    if args.rxlm:
        log = Path(tempfile.gettempdir()) / "rxrt-beta-full-rxlm.log"
        rxlm = measure_rxlm(args, ids, log)
    result = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "mem_total_bytes": meminfo()["MemTotal"],
            "mem_available_at_start_bytes": available,
            "load_average_at_end": os.getloadavg(),
        },
        "settings": {
            k: getattr(args, k)
            for k in ("threads", "dtype", "system_tokens", "query_tokens", "batch_query_tokens", "answer_tokens")
        }
        | {
            "batch": args.batch,
            "config": str(args.config or "published"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "checkpoint": {
            "directory": str(args.out),
            "tensors_in_file": sum(math.prod(s) for _, s in spec.values()),
            "spec": str(args.spec or BETA_SPEC),
            **written,
        },
        "rxruntime": ours,
        "rxlm": rxlm,
    }
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
