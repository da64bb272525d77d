"""One conversation of N turns: RxT against a stateless decoder-only baseline.

RxT reads only the current query (plus its fixed-size STM), so its turn should cost the same at
turn 20 as at turn 1. The baseline is Hugging Face ``LlamaForCausalLM`` with random weights and
the same active parameters per token, used as a chat user would use it: every turn it prefills
the whole history plus the new query, then decodes with its KV cache.

Protocol (both models, same machine, dtype and device): queries of ``query_tokens`` random ids in
the template ``[BOS] [Q] query [A]``, answers forced to ``answer_tokens`` tokens (greedy, EOS
ignored), each generated token read back on the host as a streaming client would. Per turn:

* ``ttft_s``: query in -> first answer token on the host (RxT: memory K/V, prefill, sample);
* ``turn_s``: query in -> last answer token (what the user waits for);
* ``tokens_per_s``: decode rate after the first token, ``(answer_tokens - 1) / (turn_s - ttft_s)``;
* ``memory_update_s`` (RxT only): ``model.memory_update(stm, interaction)`` timed on its own after
  the answer. The runtime runs it in the background, so it is not part of ``turn_s``.

RxT and baseline turns alternate, so load from other processes hits both alike; ``repeats`` runs
the whole conversation again and every figure is the per-turn median.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rxruntime.models import ConfigError, DecodeBatch, JoinRequest, RxTModel, SamplingParams, preset

from .decode import c_step_note


@dataclass
class TurnsConfig:
    """What to run; every field lands in the JSON's ``config``."""

    preset: str = "alpha-mini"
    turns: int = 20
    query_tokens: int = 32
    answer_tokens: int = 64
    device: str = "cpu"
    repeats: int = 1
    seed: int = 0
    temperature: float = 0.0
    """0 is greedy; otherwise RxT samples with its own sampler and the baseline with
    ``multinomial(softmax(logits / T))`` (as RxLM's ``interact`` does)."""
    compile: bool = False
    """``torch.compile`` RxT's decode step first (:meth:`RxTModel.compile_decode`); the
    baseline stays eager, as transformers runs it by default."""


@dataclass
class TurnRecord:
    """Timings of one turn (seconds; ``memory_update_s`` is None for the baseline)."""

    turn: int
    ttft_s: float
    turn_s: float
    tokens_per_s: float
    memory_update_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.memory_update_s is None:
            del d["memory_update_s"]
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- the baseline
def baseline_config(model: RxTModel, max_positions: int) -> Any:
    """A ``LlamaConfig`` matching the RxT decoder: width, depth, vocabulary, self-attention heads,
    RoPE base and norm eps; the MLP width is chosen so the active parameters per token match
    ``model.active_parameter_count()`` as closely as an integer width allows."""
    from transformers import LlamaConfig

    c, d = model.config, model.config.decoder
    head_dim = c.dim // d.num_heads
    attn = c.dim * head_dim * (2 * d.self_q_heads + 2 * d.self_kv_heads)
    fixed = c.num_layers * (attn + 2 * c.dim) + c.dim + c.vocab_size * c.dim + c.dim  # + final norm, head, 1 row
    intermediate = max(1, round((model.active_parameter_count() - fixed) / (3 * c.dim * c.num_layers)))
    kwargs: dict[str, Any] = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=intermediate,
        num_hidden_layers=c.num_layers,
        num_attention_heads=d.self_q_heads,
        num_key_value_heads=d.self_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_base,  # transformers 5 turns it into rope_parameters
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=c.special_tokens.bos_id,
        eos_token_id=c.special_tokens.eos_id,
        pad_token_id=c.special_tokens.pad_id,
    )
    return LlamaConfig(**kwargs)


def active_parameters(module: torch.nn.Module, vocab_size: int, dim: int) -> int:
    """All parameters but the embedding table, plus one embedding row: what a dense decoder reads
    per token (counted the way ``RxTModel.active_parameter_count`` counts)."""
    return sum(p.numel() for p in module.parameters()) - vocab_size * dim + dim


def build_baseline(model: RxTModel, max_positions: int, seed: int) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(baseline_config(model, max_positions))
    # nn.Module's own methods: transformers' overrides are untyped
    return torch.nn.Module.train(torch.nn.Module.to(llama, device=model.device, dtype=model.dtype), False)


# ---------------------------------------------------------------------- one turn of each
def _rxt_turn(
    model: RxTModel,
    batch: DecodeBatch,
    stm: Tensor,
    prompt: list[int],
    answer_tokens: int,
    key: object,
    params: SamplingParams,
) -> tuple[TurnRecord, list[int], Tensor]:
    device = model.device
    eos = model.config.special_tokens.eos_id
    _sync(device)
    start = time.perf_counter()
    answer = [int(batch.join([JoinRequest(key, prompt, stm[0], params, params.resolved_seed())])[0])]
    ttft = time.perf_counter() - start
    for _ in range(answer_tokens - 1):
        answer.append(int(batch.step()[0]))
    turn = time.perf_counter() - start
    batch.leave(key)
    ids = torch.tensor([[*prompt, *answer, eos]], device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        new_stm = model.memory_update(stm, ids)
    _sync(device)
    update = time.perf_counter() - start
    rate = (answer_tokens - 1) / max(turn - ttft, 1e-9)
    return TurnRecord(0, ttft, turn, rate, update), answer, new_stm


def _pick(logits: Tensor, temperature: float) -> Tensor:
    """The baseline's next token (1, 1): greedy, or plain sampling at ``temperature``."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)


def _baseline_turn(llama: Any, ids: list[int], answer_tokens: int, temperature: float) -> tuple[TurnRecord, list[int]]:
    device = next(llama.parameters()).device
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = llama(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
        token = _pick(out.logits[:, -1], temperature)
        answer = [int(token)]
        ttft = time.perf_counter() - start
        cache = out.past_key_values
        for _ in range(answer_tokens - 1):
            out = llama(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = _pick(out.logits[:, -1], temperature)
            answer.append(int(token))
        turn = time.perf_counter() - start
    rate = (answer_tokens - 1) / max(turn - ttft, 1e-9)
    return TurnRecord(0, ttft, turn, rate), answer


# ---------------------------------------------------------------------- the conversation
def run_turns(cfg: TurnsConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the conversation ``cfg.repeats`` times; per-turn medians for RxT and the baseline."""
    import transformers

    config = preset(cfg.preset)
    tokens = config.special_tokens
    prompt_len = cfg.query_tokens + 3  # [BOS] [Q] query [A]
    if prompt_len + cfg.answer_tokens + 1 > config.max_seq_len:
        raise ConfigError(
            f"a {cfg.query_tokens}-token query and a {cfg.answer_tokens}-token answer do not fit the "
            f"{config.max_seq_len}-token interaction of preset {cfg.preset!r}"
        )
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = RxTModel(config).to(device).eval()
    if cfg.compile:
        model.compile_decode()
    interaction_len = prompt_len + cfg.answer_tokens + 1
    llama = build_baseline(model, max_positions=cfg.turns * interaction_len + 64, seed=cfg.seed)
    batch = DecodeBatch(model, capacity=1)
    gen = torch.Generator().manual_seed(cfg.seed)
    queries = [
        torch.randint(7, config.vocab_size, (cfg.query_tokens,), generator=gen).tolist() for _ in range(cfg.turns)
    ]
    prompts = [[tokens.bos_id, tokens.query_id, *q, tokens.answer_id] for q in queries]

    # Warm-up (untimed): first-call allocations and kernel selection of both models.
    params = SamplingParams(temperature=cfg.temperature, seed=cfg.seed)
    warm_stm = model.init_stm(1, torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    _rxt_turn(model, batch, warm_stm, prompts[0], min(8, cfg.answer_tokens), "warm-up", params)
    _baseline_turn(llama, prompts[0], min(8, cfg.answer_tokens), cfg.temperature)

    rxt_runs: list[list[TurnRecord]] = []
    base_runs: list[list[TurnRecord]] = []
    load_start = os.getloadavg()
    for r in range(cfg.repeats):
        stm = model.init_stm(1, torch.Generator().manual_seed(cfg.seed)).to(device)
        history: list[int] = []
        rxt_records, base_records = [], []
        for t, prompt in enumerate(prompts, start=1):
            rec, _, stm = _rxt_turn(model, batch, stm, prompt, cfg.answer_tokens, ("turn", r, t), params)
            rec.turn = t
            rxt_records.append(rec)
            context = history + prompt
            base, answer = _baseline_turn(llama, context, cfg.answer_tokens, cfg.temperature)
            base.turn = t
            base_records.append(base)
            history += [*prompt, *answer, tokens.eos_id]
            if progress:
                progress(
                    f"repeat {r + 1}/{cfg.repeats} turn {t}/{cfg.turns}: RxT {rec.turn_s:.3f}s "
                    f"(+{rec.memory_update_s or 0:.3f}s memory update), baseline {base.turn_s:.3f}s "
                    f"({len(context)} tokens prefilled)"
                )
        rxt_runs.append(rxt_records)
        base_runs.append(base_records)

    rxt = _median_records(rxt_runs)
    baseline = _median_records(base_runs)
    last_rxt, last_base = rxt[-1], baseline[-1]
    return {
        "rxt": [r.to_dict() for r in rxt],
        "baseline": [r.to_dict() for r in baseline],
        "config": {
            **asdict(cfg),
            "dtype": str(model.dtype).removeprefix("torch."),
            "sampling": ("greedy" if cfg.temperature <= 0 else f"temperature {cfg.temperature}") + ", EOS ignored",
            "rxt_active_parameters": model.active_parameter_count(),
            "baseline": "transformers.LlamaForCausalLM, random weights, KV cache within a turn",
            "baseline_active_parameters": active_parameters(llama, config.vocab_size, config.dim),
            "baseline_intermediate_size": llama.config.intermediate_size,
            "baseline_layers": llama.config.num_hidden_layers,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "c_decode_step": "not used (compiled)" if cfg.compile else c_step_note(model),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg()),
        },
        "summary": {
            "turn": last_rxt.turn,
            "turn_ratio": last_base.turn_s / last_rxt.turn_s,
            "ttft_ratio": last_base.ttft_s / last_rxt.ttft_s,
            "rxt_total_s": sum(r.turn_s for r in rxt),
            "baseline_total_s": sum(r.turn_s for r in baseline),
        },
    }


def _median_records(runs: list[list[TurnRecord]]) -> list[TurnRecord]:
    out = []
    for turn in zip(*runs):
        updates = [r.memory_update_s for r in turn if r.memory_update_s is not None]
        out.append(
            TurnRecord(
                turn=turn[0].turn,
                ttft_s=statistics.median(r.ttft_s for r in turn),
                turn_s=statistics.median(r.turn_s for r in turn),
                tokens_per_s=statistics.median(r.tokens_per_s for r in turn),
                memory_update_s=statistics.median(updates) if updates else None,
            )
        )
    return out


# ---------------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> Any:
    """A rich Table: one row per turn, RxT next to the baseline, and their turn-time ratio."""
    from rich.table import Table

    cfg = result["config"]
    table = Table(
        title=f"{cfg['turns']} turns, preset {cfg['preset']}, {cfg['device']} {cfg['dtype']}, "
        f"{cfg['threads']} threads (query {cfg['query_tokens']}, answer {cfg['answer_tokens']} tokens)"
    )
    for name in (
        "turn",
        "RxT TTFT s",
        "RxT tok/s",
        "RxT turn s",
        "RxT memory update s",
        "baseline TTFT s",
        "baseline tok/s",
        "baseline turn s",
        "baseline / RxT turn",
    ):
        table.add_column(name, justify="right")
    for r, b in zip(result["rxt"], result["baseline"]):
        table.add_row(
            str(r["turn"]),
            f"{r['ttft_s']:.3f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['turn_s']:.3f}",
            f"{r['memory_update_s']:.3f}",
            f"{b['ttft_s']:.3f}",
            f"{b['tokens_per_s']:.1f}",
            f"{b['turn_s']:.3f}",
            f"{b['turn_s'] / r['turn_s']:.2f}x",
        )
    return table


def plot_turns(
    result: dict[str, Any], path: str | Path, extra: Sequence[tuple[str, list[dict[str, Any]]]] = ()
) -> None:
    """Turn time against turn number: RxT (with and without its synchronous memory update),
    the baseline, and any ``extra`` (label, records) series such as RxLM's ``interact``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    turns = [r["turn"] for r in result["rxt"]]
    ax.plot(turns, [b["turn_s"] for b in result["baseline"]], "o-", label="stateless Llama baseline (re-reads history)")
    rxt = "RxT (rxruntime, compiled decode)" if cfg.get("compile") else "RxT (rxruntime)"
    ax.plot(turns, [r["turn_s"] for r in result["rxt"]], "o-", label=f"{rxt}: user-facing turn")
    ax.plot(
        turns,
        [r["turn_s"] + r["memory_update_s"] for r in result["rxt"]],
        "--",
        label="RxT + memory update (if run synchronously)",
    )
    for label, records in extra:
        ax.plot([r["turn"] for r in records], [r["turn_s"] for r in records], "s-", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("turn")
    ax.set_ylabel("turn time (s), query in -> last token out")
    ax.set_title(
        f"{cfg['preset']}: {cfg['query_tokens']}-token queries, {cfg['answer_tokens']}-token answers\n"
        f"({cfg['sampling']}), {cfg['device']} {cfg['dtype']}, {cfg['threads']} threads",
        fontsize=9,
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
