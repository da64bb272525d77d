"""The RxLM side of the same-weights benchmark: RxLM's own ``interact`` and ``batch_interact``.

Runs inside an RxLM virtual environment (RxLM pins transformers < 5; nothing of it is vendored
here). Three subcommands:

* ``save DIR``: the alpha-mini architecture (the RxT-Alpha Supervised card) with random weights,
  written by RxLM's ``save_pretrained`` with a word-level ``tokenizer.json`` covering the whole
  vocabulary. The ``[EOS]`` row of the LM head (weight and bias) is half of another row, so greedy
  answers never end on it and every side decodes the same number of tokens.
* ``turns``: one conversation through ``interact`` (batch 1): per turn ``ttft_s``, ``turn_s``,
  ``tokens_per_s`` (after the first token) and ``memory_update_s`` (``interact`` runs the update
  between yielding -1 and -2, synchronously).
* ``batch``: one turn of N conversations through ``batch_interact``: aggregate tokens/s, the
  first step's latency and the batched memory update.

``--checkpoint DIR`` loads a saved directory; without it, a fresh random model is built in memory.
Queries come from ``--queries FILE`` (a JSON list of id lists, as benchmarks/rxlm_same_weights.py
writes it, so every side reads the same ids) or are drawn from ``--seed``. Sampling is greedy
(``top_k=1``: RxLM's sampler keeps one token) unless ``--temperature`` is given. RxLM 0.3.x runs
its vectorized MoE: the legacy expert weights of a 0.2.x checkpoint are restacked into its
``w1``/``b1``/``w2``/``b2`` layout (``moe_bias_mode='local'``, no shared expert), the same weights
and maths, and its ``interact`` bugs are fixed on the instance (rxlm_workarounds.py beside it)::

    /work/venvs/rxlm-0.2.31/bin/python benchmarks/rxlm_env/rxlm_turns.py save /tmp/alpha-mini-rxlm
    /work/venvs/rxlm-0.3.80/bin/python benchmarks/rxlm_env/rxlm_turns.py turns --checkpoint /tmp/alpha-mini-rxlm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside it, run from a checkout
from rxlm_common import alpha_card, read_state, ready, timed_batch_interact

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[Q]", "[A]", "[T]"]  # rxruntime's ids 0-6


def alpha_mini(
    vocab: int = 20000, dim: int = 256, layers: int = 12, slots: int = 256, seq: int = 256
) -> dict[str, Any]:
    """RxT-Alpha (Supervised) card in RxLM's config vocabulary."""
    component, memory = alpha_card(vocab=vocab, dim=dim, heads=16, layers=layers, slots=slots, seq=seq, groups=8)
    decoder = dict(component, ff_dim=384, use_moe=True, num_experts=36, moe_top_k=6)
    encoder = dict(component, ff_dim=784, use_moe=False, skip_memory_cross_attention=True)
    tokens = dict(bos_token_id=2, eos_token_id=3, answer_token_id=5, query_token_id=4, pad_token_id=0)
    return {"decoder": decoder, "encoder": encoder, "memory": memory, "tokens": tokens}


def rxlm_version() -> str:
    return dist_version("rxlm")


TINY = dict(vocab=600, dim=64, layers=2, slots=16)  # smoke runs of the same code paths


def build(seed: int, tiny: bool = False) -> Any:
    """A fresh random alpha-mini RxTAlpha with an unreachable [EOS] (not yet shared)."""
    import torch
    from rxlm.rxt.models import RxTAlpha

    cfg = alpha_mini(**TINY) if tiny else alpha_mini()
    torch.manual_seed(seed)
    model = RxTAlpha(
        cfg["decoder"], cfg["encoder"], cfg["memory"], cfg["tokens"], memory_attention_variant="self-interlayer"
    )
    head = model.decoder.model.head
    eos, other = cfg["tokens"]["eos_token_id"], len(SPECIAL_TOKENS)
    with torch.no_grad():
        head.weight[eos] = 0.5 * head.weight[other]
        head.bias[eos] = 0.5 * head.bias[other]
    return model


def word_tokenizer_json(vocab: int, path: Path) -> None:
    """``tokenizer.json`` of a word-level tokenizer with one piece of text per id (``t7`` ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    words.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(path))


def save(directory: Path, seed: int, tiny: bool = False) -> None:
    model = build(seed, tiny)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))  # before share_components: every component's tensors
    word_tokenizer_json(model.decoder_config["vocab_size"], directory / "tokenizer.json")
    print(f"saved alpha-mini (rxlm {rxlm_version()}) to {directory}", file=sys.stderr)


def restack_legacy_moe(state: dict[str, Any], decoder_layers: int, experts: int) -> dict[str, Any]:
    """0.2.x ModuleList experts -> 0.3.x vectorized tensors (x @ w1, local biases)."""
    import torch

    out = dict(state)
    for i in range(decoder_layers):
        pre = f"decoder.model.layers.{i}.ff."
        parts: dict[str, list[Any]] = {"w1": [], "b1": [], "w2": [], "b2": []}
        for e in range(experts):
            ex = f"{pre}experts.{e}."
            parts["w1"].append(out.pop(ex + "fc1.linear.weight").T)
            parts["b1"].append(out.pop(ex + "fc1.linear.bias"))
            parts["w2"].append(out.pop(ex + "fc2.weight").T)
            parts["b2"].append(out.pop(ex + "fc2.bias"))
        for name, tensors in parts.items():
            out[pre + name] = torch.stack(tensors).contiguous()
    return out


def load(directory: Path) -> tuple[Any, list[str]]:
    """RxLM's model from a saved directory, shared and in eval mode; notes on what was adapted."""
    from rxlm.rxt.models import RxTAlpha

    notes: list[str] = []
    if rxlm_version().startswith("0.2"):
        model = RxTAlpha.from_pretrained(str(directory))
    else:
        config = json.loads((directory / "config.json").read_text())
        dec = dict(config["decoder_config"])
        if dec.get("use_moe"):
            dec.update(use_vectorized_moe=True, num_shared_experts=0, moe_bias_mode="local", moe_grouped_gemm=False)
            notes.append(
                "0.3.x vectorized MoE: legacy expert weights restacked into w1/b1/w2/b2 (moe_bias_mode local,"
                " no shared expert): same weights, same maths"
            )
        config["decoder_config"] = dec
        model = RxTAlpha(**config)
        state = read_state(directory)
        if dec.get("use_moe"):
            state = restack_legacy_moe(state, dec["num_layers"], dec["num_experts"])
        if model.encoder.model.stm is None and state.pop("encoder.model.stm.memory", None) is not None:
            notes.append("0.3.x encoders without cross-attention have no STM buffer: the file's copy is dropped")
        # shared RoPE buffers are saved once (safetensors drops aliases); everything else must match
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(".rope." in k for k in missing), (unexpected, missing)
    return model, notes + ready(model)


def queries_from(args: argparse.Namespace, count: int, vocab: int) -> list[list[int]]:
    if args.queries:
        return [list(map(int, q)) for q in json.loads(Path(args.queries).read_text())][:count]
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    low = len(SPECIAL_TOKENS)
    return [torch.randint(low, vocab, (args.query_tokens,), generator=gen).tolist() for _ in range(count)]


def sampling(temperature: float) -> dict[str, Any]:
    """``interact``'s sampling arguments: greedy is ``top_k=1`` (RxLM has no greedy switch)."""
    return {"temperature": 1.0, "top_k": 1} if temperature <= 0 else {"temperature": temperature}


def interact_turn(
    model: Any, ids: list[int], answer_tokens: int, temperature: float
) -> tuple[dict[str, float], list[int]]:
    """One ``interact`` turn on ``[BOS] [Q] query`` ids; its timings and answer."""
    import torch

    limit = len(ids) + 1 + answer_tokens  # interact appends [A]
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    start = time.perf_counter()
    first = last = update_start = update_end = 0.0
    answer: list[int] = []
    for token in model.interact(input_ids, mask, max_seq_len=limit, **sampling(temperature)):
        now = time.perf_counter()
        if token == -1:
            update_start = now
        elif token == -2:
            update_end = now
        else:
            answer.append(token)
            first = first or now
            last = now
    assert len(answer) == answer_tokens, (len(answer), answer_tokens)
    return {
        "ttft_s": first - start,
        "turn_s": last - start,
        "tokens_per_s": (len(answer) - 1) / (last - first),
        "memory_update_s": update_end - update_start,
    }, answer


def reset_stm(model: Any, seed: int = 0) -> None:
    """The initial STM every side starts from: ``randn(layers, slots, dim)`` from ``seed``."""
    import torch

    model.set_batch_mode(False)
    shape = model.export_stm_state().shape
    model.load_stm_state(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def run_turns(
    model: Any, queries: list[list[int]], answer_tokens: int, repeats: int, temperature: float
) -> dict[str, Any]:
    prompts = [[model.bos_token_id, model.query_token_id, *q] for q in queries]
    interact_turn(model, prompts[0], answer_tokens, temperature)  # warm-up
    runs, answers = [], []
    for _ in range(repeats):
        reset_stm(model)
        records = []
        answers = []
        for t, ids in enumerate(prompts, start=1):
            rec, answer = interact_turn(model, ids, answer_tokens, temperature)
            records.append({"turn": t, **rec})
            answers.append(answer)
            print(f"turn {t}: {rec}", file=sys.stderr, flush=True)
        runs.append(records)
    keys = ("ttft_s", "turn_s", "tokens_per_s", "memory_update_s")
    turns = [
        {"turn": t + 1, **{k: statistics.median(r[t][k] for r in runs) for k in keys}} for t in range(len(prompts))
    ]
    # one list only at the top level: `rxrt bench turns --compare RxLM=FILE` reads it
    return {"rxlm": turns, "answers": {"first_8_tokens": [a[:8] for a in answers]}}


def batch_turn(model: Any, queries: list[list[int]], answer_tokens: int, temperature: float) -> dict[str, Any]:
    """One ``batch_interact`` turn of ``len(queries)`` conversations (fresh batched STM)."""
    turn = timed_batch_interact(model, queries, answer_tokens, **sampling(temperature))
    assert turn.steps == answer_tokens, (turn.steps, answer_tokens)
    tokens = turn.conversations * turn.steps
    return {
        "conversations": turn.conversations,
        "tokens": tokens,
        "tokens_per_s": tokens / (turn.last - turn.start),
        "ttft_s": turn.first - turn.start,
        "wall_s": turn.last - turn.start,
        "memory_update_s": turn.update_end - turn.update_start,
    }


def run_batch(model: Any, queries: list[list[int]], answer_tokens: int, temperature: float) -> dict[str, Any]:
    batch_turn(model, queries, answer_tokens, temperature)  # warm-up: first-call allocations at this size
    return batch_turn(model, queries, answer_tokens, temperature)


def serve(model: Any, temperature: float, info: dict[str, Any]) -> None:
    """One JSON request per stdin line, one JSON reply per stdout line, so that a driver can
    alternate this process's turns with other frameworks' turns on a shared machine.

    Requests: ``{"op": "reset"}`` (the seed-0 initial STM), ``{"op": "turn", "ids": [...],
    "answer_tokens": n}``, ``{"op": "batch", "queries": [[...], ...], "answer_tokens": n}``.
    """
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "reset":
            reset_stm(model)
            reply: dict[str, Any] = {"ok": True}
        elif req["op"] == "turn":
            rec, answer = interact_turn(model, req["ids"], req["answer_tokens"], temperature)
            reply = {**rec, "answer": answer}
        elif req["op"] == "batch":
            reply = batch_turn(model, req["queries"], req["answer_tokens"], temperature)
        else:
            reply = {"error": f"unknown op {req['op']!r}"}
        print(json.dumps(reply), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_save = sub.add_parser("save", help="write a random alpha-mini checkpoint with RxLM's save_pretrained")
    p_save.add_argument("directory", type=Path)
    p_save.add_argument("--seed", type=int, default=0)
    p_save.add_argument("--tiny", action="store_true", help="dim 64, 2 layers, 600 tokens: for smoke runs")
    for name in ("turns", "batch", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", type=Path, help="an RxLM model directory (default: a fresh random model)")
        p.add_argument("--queries", type=Path, help="JSON list of query id lists (default: random from --seed)")
        p.add_argument("--query-tokens", type=int, default=32)
        p.add_argument("--answer-tokens", type=int, default=64 if name == "turns" else 32)
        p.add_argument("--threads", type=int)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path)
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (top_k=1)")
        if name == "turns":
            p.add_argument("--turns", type=int, default=20)
            p.add_argument("--repeats", type=int, default=1)
        else:
            p.add_argument("--conversations", type=int, default=16)
    args = parser.parse_args(argv)

    if args.command == "save":
        save(args.directory, args.seed, args.tiny)
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, notes = load(args.checkpoint)
    else:
        model = build(args.seed)
        notes = ready(model)
    if args.command == "serve":
        import transformers

        info = {"rxlm": rxlm_version(), "transformers": transformers.__version__, "adaptations": notes}
        serve(model, args.temperature, info)
        return 0
    vocab = model.decoder_config["vocab_size"]
    load_avg = [os.getloadavg()[0]]
    if args.command == "turns":
        qs = queries_from(args, args.turns, vocab)
        result = run_turns(model, qs, args.answer_tokens, args.repeats, args.temperature)
        api = "RxTAlpha.interact"
    else:
        qs = queries_from(args, args.conversations, vocab)
        result = run_batch(model, qs, args.answer_tokens, args.temperature)
        api = "RxTAlpha.batch_interact"
    load_avg.append(os.getloadavg()[0])
    import transformers

    result["config"] = {
        "framework": f"rxlm {rxlm_version()}",
        "api": api,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "preset": "alpha-mini (RxT-Alpha card)",
        "query_tokens": args.query_tokens,
        "answer_tokens": args.answer_tokens,
        "sampling": ("greedy (top_k=1)" if args.temperature <= 0 else f"temperature {args.temperature}")
        + ", [EOS] unreachable",
        "dtype": "float32",
        "device": "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "adaptations": notes,
        "load_average": load_avg,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
