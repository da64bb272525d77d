"""RxLM's side of the full-size RxT-Beta benchmark (benchmarks/beta_full_size.py drives it).

Runs inside an RxLM 0.3 virtual environment (nothing of RxLM is vendored here). Two subcommands:

* ``spec CONFIG_JSON``: the tensors RxLM's ``RxTBeta`` has for that ``config.json`` (name, shape,
  dtype of every state-dict entry, as ``save_pretrained`` writes them before ``share_components``),
  built on the meta device so that no weight is allocated. benchmarks/rxt_beta_tensors.json is this
  output for RxT-Beta-Supervised's published options.
* ``measure DIR``: load the checkpoint, read a system prompt into memory, run one greedy
  ``interact`` turn (``thinking_mode="fast"``) and one ``batch_interact`` turn, and print their
  timings and the process's resident memory as JSON. The model is built on the meta device and
  takes the file's tensors as they are (``load_state_dict(assign=True)``): bf16 weights stay bf16,
  so the process holds one copy of the 5.7 GB of weights, never a float32 one (11.4 GB).

Ids come from ``--ids FILE`` (JSON ``{"system": [...], "queries": [[...], ...]}``: the first query
for the single turn, the next ``--batch`` for the batch turn) as the driver wrote them, so both
frameworks read the same tokens::

    /work/rxlm-0.3.93-venv/bin/python benchmarks/rxlm_env/rxlm_beta_full.py spec config.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside it, run from a checkout
from rxlm_common import read_state, ready, timed_batch_interact

_DTYPES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16", "torch.int64": "I64"}


def rss_bytes() -> tuple[int, int]:
    """(resident now, peak resident) of this process, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    now = int(fields["VmRSS"].split()[0]) * 1024
    peak = int(fields.get("VmHWM", fields["VmRSS"]).split()[0]) * 1024
    return now, max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def build_meta(config: dict[str, Any]) -> Any:
    import torch
    from rxlm.rxt.models import RxTBeta

    kwargs = {k: v for k, v in config.items() if k != "tokenizer"}
    with torch.device("meta"):
        return RxTBeta(**kwargs)


def spec(config_path: Path) -> dict[str, Any]:
    model = build_meta(json.loads(config_path.read_text()))
    tensors = {name: {"dtype": _DTYPES[str(t.dtype)], "shape": list(t.shape)} for name, t in model.state_dict().items()}
    return {"rxlm": dist_version("rxlm"), "class": "RxTBeta", "tensors": tensors}


def load(directory: Path) -> tuple[Any, dict[str, Any]]:
    """RxLM's RxTBeta with the checkpoint's tensors in their stored dtype, shared, eval, fixed."""
    import torch

    start = time.perf_counter()
    config = json.loads((directory / "config.json").read_text())
    model = build_meta(config)
    state = read_state(directory)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    assert not unexpected, unexpected[:5]
    assert not missing, missing[:5]
    for module in model.modules():  # non-persistent training statistics (aux losses): zeros
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta and key.endswith("loss"):
                module._buffers[key] = torch.zeros(buf.shape, dtype=buf.dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"tensors the file does not hold: {left[:5]}"
    notes = ready(model)
    loaded = time.perf_counter() - start
    now, peak = rss_bytes()
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return model, {"load_s": loaded, "rss_bytes": now, "peak_rss_bytes": peak, "dtypes": dtypes, "notes": notes}


def measure(model: Any, ids: dict[str, Any], answer_tokens: int, batch: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    system = torch.tensor([ids["system"]])
    model.set_batch_mode(False)
    start = time.perf_counter()
    model.init_stm_state(input_ids=system, attention_mask=torch.ones_like(system))
    out["system_prompt_s"] = time.perf_counter() - start
    prompt = [model.bos_token_id, model.query_token_id, *ids["queries"][0]]
    input_ids = torch.tensor([prompt])
    limit = len(prompt) + 1 + answer_tokens
    tokens: list[int] = []
    stamps: list[float] = []
    update = [0.0, 0.0]
    start = time.perf_counter()
    for token in model.interact(
        input_ids, torch.ones_like(input_ids), thinking_mode="fast", temperature=1.0, top_k=1, max_seq_len=limit
    ):
        now = time.perf_counter()
        if token == -1:
            update[0] = now
        elif token == -2:
            update[1] = now
        else:
            tokens.append(token)
            stamps.append(now)
    answer = tokens[1:]  # the [A] echo first
    out["b1"] = {
        "ttft_s": stamps[1] - start,
        "tokens": len(answer),
        "tokens_per_s": (len(answer) - 1) / (stamps[-1] - stamps[1]),
        "memory_update_s": update[1] - update[0],
        "first_8_tokens": answer[:8],
    }
    out["rss_after_turn_bytes"] = rss_bytes()[0]
    print(json.dumps({"b1": out["b1"], "system_prompt_s": out["system_prompt_s"]}), file=sys.stderr, flush=True)
    try:
        if batch > 0:  # 0: the single conversation only (the batch turn takes RxLM many minutes)
            out[f"b{batch}"] = batch_turn(model, ids["queries"][1 : 1 + batch], answer_tokens)
    except Exception as exc:  # recorded, not hidden: RxLM's batch path may not take Beta's layout
        out[f"b{batch}"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["peak_rss_bytes"] = rss_bytes()[1]
    return out


def batch_turn(model: Any, queries: list[list[int]], answer_tokens: int) -> dict[str, Any]:
    """One greedy ``batch_interact`` turn of ``len(queries)`` conversations (RxTAlpha's: ``[A]`` appended)."""
    turn = timed_batch_interact(model, queries, answer_tokens, temperature=1.0, top_k=1)
    steps = turn.steps
    return {
        "conversations": turn.conversations,
        "steps": steps,
        "ttft_s": turn.first - turn.start,
        "tokens_per_s": turn.conversations * (steps - 1) / (turn.last - turn.first) if steps > 1 else None,
        "memory_update_s": turn.update_end - turn.update_start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_spec = sub.add_parser("spec", help="the state-dict tensors of an RxTBeta config (meta device)")
    p_spec.add_argument("config", type=Path)
    p_measure = sub.add_parser("measure", help="load a checkpoint and time one interact turn")
    p_measure.add_argument("directory", type=Path)
    p_measure.add_argument("--ids", type=Path, required=True)
    p_measure.add_argument("--answer-tokens", type=int, default=16)
    p_measure.add_argument("--batch", type=int, default=8)
    p_measure.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.command == "spec":
        print(json.dumps(spec(args.config)))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = load(args.directory)
    print(json.dumps({"loaded": info}), file=sys.stderr, flush=True)
    result = measure(model, json.loads(args.ids.read_text()), args.answer_tokens, args.batch)
    import transformers

    print(
        json.dumps(
            {
                "rxlm": dist_version("rxlm"),
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load": info,
                **result,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
