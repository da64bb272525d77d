"""The turns benchmark through the reference framework: RxLM 0.2.31's ``RxTAlpha.interact``.

Run it in a separate virtual environment (RxLM pins transformers < 5 and depends on
transformer-engine); nothing of RxLM is vendored here, it is imported at run time::

    python3 -m venv /tmp/rxlm-venv && . /tmp/rxlm-venv/bin/activate
    pip install torch==2.13.0 && pip install rxlm==0.2.31
    python benchmarks/rxlm_turns.py --turns 20 --out docs/turns-rxlm.json

Same protocol as ``rxrt bench turns`` (rxruntime/bench/turns.py): the alpha-mini architecture
(RxT-Alpha card) with random weights, fp32, batch 1, ``query_tokens`` random ids after
``[BOS] [Q]`` (``interact`` appends ``[A]``), answers forced to ``answer_tokens`` tokens (EOS
made unreachable), and per turn ``ttft_s``, ``turn_s``, ``tokens_per_s`` (after the first
token) and ``memory_update_s`` (``interact`` runs the update synchronously between yielding -1
and -2). The sampler is ``interact``'s own (``temperature`` 1.0 default; greedy is not offered).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def alpha_mini(
    vocab: int = 20000, dim: int = 256, layers: int = 12, slots: int = 256, seq: int = 256
) -> dict[str, Any]:
    """RxT-Alpha (Supervised) card in RxLM's config vocabulary."""
    component = dict(
        num_layers=layers,
        vocab_size=vocab,
        embed_dim=dim,
        att_heads=16,
        seq_len=seq,
        stm_size=slots,
        use_flash_attention=False,
        use_gated=True,
        ff_activation="silu",
        ff_dropout=0.0,
        att_dropout=0.0,
        use_rms_norm=True,
        att_groups=8,
        self_att_type="sqa",
        cross_att_type="sqa",
        att_query_groups=8,
        cross_att_groups=8,
        cross_att_query_groups=8,
    )
    decoder = dict(component, ff_dim=384, use_moe=True, num_experts=36, moe_top_k=6)
    encoder = dict(component, ff_dim=784, use_moe=False, skip_memory_cross_attention=True)
    memory = dict(
        num_layers=layers,
        embed_dim=dim,
        att_heads=16,
        seq_len=seq,
        stm_size=slots,
        use_flash_attention=False,
        att_groups=8,
        att_type="sqa",
        att_query_groups=8,
        interlayer_att_groups=8,
        interlayer_att_type="sqa",
        interlayer_att_query_groups=8,
        norm_type="classic-rms",
        use_gated_residual=True,
        residual_per_slot_gate=True,
        residual_gate_type="linear",
        use_tanh_residual_gate=False,
    )
    tokens = dict(bos_token_id=2, eos_token_id=3, answer_token_id=5, query_token_id=4, pad_token_id=0)
    return {"decoder": decoder, "encoder": encoder, "memory": memory, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import rxlm
    import torch
    from rxlm.rxt.models import RxTAlpha

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = alpha_mini()
    torch.manual_seed(args.seed)
    model = RxTAlpha(
        cfg["decoder"], cfg["encoder"], cfg["memory"], cfg["tokens"], memory_attention_variant="self-interlayer"
    )
    model.share_components()
    model.eval()
    model.eos_token_id = -1  # forced answer length: no token id is -1
    gen = torch.Generator().manual_seed(args.seed)
    vocab = cfg["decoder"]["vocab_size"]
    queries = [
        [2, 4, *torch.randint(7, vocab, (args.query_tokens,), generator=gen).tolist()] for _ in range(args.turns)
    ]
    limit = args.query_tokens + 3 + args.answer_tokens  # [BOS] [Q] query [A] answer

    def turn(ids: list[int]) -> dict[str, float]:
        input_ids = torch.tensor([ids])
        mask = torch.ones_like(input_ids)
        start = time.perf_counter()
        first = last = update_start = update_end = 0.0
        count = 0
        for token in model.interact(input_ids, mask, temperature=args.temperature, max_seq_len=limit):
            now = time.perf_counter()
            if token == -1:
                update_start = now
            elif token == -2:
                update_end = now
            else:
                count += 1
                first = first or now
                last = now
        assert count == args.answer_tokens, count
        return {
            "ttft_s": first - start,
            "turn_s": last - start,
            "tokens_per_s": (count - 1) / (last - first),
            "memory_update_s": update_end - update_start,
        }

    turn(queries[0])  # warm-up
    runs = []
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        model.reset_stm_state()
        records = []
        for t, ids in enumerate(queries, start=1):
            records.append({"turn": t, **turn(ids)})
            print(f"turn {t}: {records[-1]}", file=sys.stderr, flush=True)
        runs.append(records)
        load.append(os.getloadavg()[0])
    keys = ("ttft_s", "turn_s", "tokens_per_s", "memory_update_s")
    result = {
        "rxlm": [
            {"turn": t + 1, **{k: statistics.median(r[t][k] for r in runs) for k in keys}} for t in range(args.turns)
        ],
        "config": {
            "framework": f"rxlm {getattr(rxlm, '__version__', '0.2.31')}",
            "api": "RxTAlpha.interact",
            "preset": "alpha-mini (RxT-Alpha card)",
            "turns": args.turns,
            "query_tokens": args.query_tokens,
            "answer_tokens": args.answer_tokens,
            "repeats": args.repeats,
            "temperature": args.temperature,
            "dtype": "float32",
            "device": "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "load_average": load,
        },
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
