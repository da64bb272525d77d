"""One conversation of N turns: RxT against a stateless decoder-only baseline.

RxT reads only the current query (plus its fixed-size STM), so its turn should cost the same at
turn 20 as at turn 1. The baseline is Hugging Face ``LlamaForCausalLM`` with random weights and
the same active parameters per token, used as a chat user would use it: every turn it prefills
the whole history plus the new query, then decodes with its KV cache.

Protocol (both models, same machine, dtype and device): queries of ``query_tokens`` random ids in
the template ``[BOS] [Q] query [A]``, answers forced to ``answer_tokens`` tokens (greedy, EOS
ignored), each generated token read back on the host as a streaming client would. Per turn:

* ``ttft_s``: query in -> first answer token on the host (RxT: prefill, sample; the memory K/V
  are made before the query arrives, as the engine makes them: at turn 1 when the conversation
  opens, then by each memory update);
* ``turn_s``: query in -> last answer token (what the user waits for);
* ``tokens_per_s``: decode rate after the first token, ``(answer_tokens - 1) / (turn_s - ttft_s)``;
* ``memory_update_s`` (RxT only): ``model.memory_update(stm, interaction)`` and the next turn's
  memory K/V, timed on their own after the answer. The engine runs both in the background (the
  memory K/V with the update that makes the STM), so they are not part of ``turn_s``.

RxT and baseline turns alternate, so load from other processes hits both alike; ``repeats`` runs
the whole conversation again and every figure is the per-turn median.

RxT can run once per weight format (``weights``: fp32, bf16, int8), and with ``baseline="llamacpp"``
the same baseline Llama also runs in llama.cpp, as GGUF f32 and q8_0, with its prompt cache kept
and with the history re-read (``llamacpp_turns.py``). The table, the summary and the plot are in
``turns_report.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rxruntime.models import ConfigError, DecodeBatch, JoinRequest, RxTConfig, RxTModel, SamplingParams, preset
from rxruntime.models.decoder import MemoryKV
from rxruntime.models.quantize import check_format

from .decode import DEFAULT_WEIGHTS, ROWWISE, apply_weights, c_step_note, kernel_label, resolve_dtype
from .llamacpp_runtime import check_llama_cpp
from .llamacpp_turns import TIMEOUT_S, LlamaCppPeer, PeerFailedError, check_types, prepare_peers
from .turns_report import format_table, plot_turns, summarize

__all__ = ["BASELINES", "TurnRecord", "TurnsConfig", "format_table", "plot_turns", "run_turns"]

BASELINES = ("transformers", "llamacpp")
"""``transformers``: the HF baseline only; ``llamacpp``: it and llama.cpp in both modes."""


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
    weights: list[str] = field(default_factory=lambda: [DEFAULT_WEIGHTS])
    """RxT's weight formats (``models/quantize.py``), one series each; the first is ``rxt``.
    ``default`` is the engine's own for the device (int8 where the C step runs a float32 CPU
    model, float32 elsewhere: what ``rxrt chat`` and ``serve`` run); the JSON's ``config.weights``
    holds the formats it resolved to, ``config.weights_requested`` these."""
    dtype: str = DEFAULT_WEIGHTS
    """What both models compute in (:func:`~rxruntime.bench.decode.resolve_dtype`): ``default``
    is the engine's own (bfloat16 on CUDA, float32 on the CPU); float16 and bfloat16 are CUDA's."""
    baseline: str = "transformers"
    """``transformers``, or ``llamacpp`` to add llama.cpp (both modes) beside it."""
    llamacpp_types: list[str] = field(default_factory=lambda: ["f32", "q8_0"])
    """GGUF weight types llama.cpp runs (``f32``: the exported file; ``q8_0``: llama.cpp's quantiser)."""
    llamacpp_timeout_s: float = TIMEOUT_S
    """Limit on one command to a llama.cpp child (loading, one turn); past it the series is reported
    as timed out and the others run on."""


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
    memory_kv: MemoryKV | None = None,
) -> tuple[TurnRecord, list[int], Tensor, MemoryKV]:
    """One turn as the engine runs it: the join takes the memory keys/values the previous turn's
    memory update made (``memory_kv``; the first turn's were made when the conversation opened),
    and the memory update makes the next turn's with the new STM, timed as part of the update."""
    device = model.device
    eos = model.config.special_tokens.eos_id
    _sync(device)
    start = time.perf_counter()
    request = JoinRequest(key, prompt, stm[0], params, params.resolved_seed(), memory_kv=memory_kv)
    answer = [int(batch.join([request])[0])]
    ttft = time.perf_counter() - start
    for _ in range(answer_tokens - 1):
        answer.append(int(batch.step()[0]))
    turn = time.perf_counter() - start
    batch.leave(key)
    ids = torch.tensor([[*prompt, *answer, eos]], device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        new_stm = model.memory_update(stm, ids)
        next_kv = model.row_memory_kv(new_stm[0])
    _sync(device)
    update = time.perf_counter() - start
    rate = (answer_tokens - 1) / max(turn - ttft, 1e-9)
    return TurnRecord(0, ttft, turn, rate, update), answer, new_stm, next_kv


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
def _rxt_models(cfg: TurnsConfig, config: RxTConfig, device: torch.device) -> tuple[dict[str, RxTModel], list[str]]:
    """One RxT per weight format, all from the same seed (so the same float32 weights before
    rounding), and the formats they have (``default`` resolved); ConfigError if two are the same."""
    models: dict[str, RxTModel] = {}
    formats: list[str] = []
    for requested in cfg.weights:
        torch.manual_seed(cfg.seed)
        model = RxTModel(config).to(device, resolve_dtype(cfg.dtype, device)).eval()
        fmt = apply_weights(model, requested)
        if fmt in formats:
            raise ConfigError(f"--weights {','.join(cfg.weights)} runs {fmt} twice (default is {fmt} here)")
        formats.append(fmt)
        if cfg.compile:
            model.compile_decode()
        models["rxt" if not models else f"rxt_{fmt}"] = model
    return models, formats


def _check(cfg: TurnsConfig, config: RxTConfig, device: torch.device) -> None:
    """Every option checked before anything is built: a bad one is a ConfigError (exit code 2)."""
    prompt_len = cfg.query_tokens + 3  # [BOS] [Q] query [A]
    if prompt_len + cfg.answer_tokens + 1 > config.max_seq_len:
        raise ConfigError(
            f"a {cfg.query_tokens}-token query and a {cfg.answer_tokens}-token answer do not fit the "
            f"{config.max_seq_len}-token interaction of preset {cfg.preset!r}"
        )
    if min(cfg.turns, cfg.repeats, cfg.query_tokens, cfg.answer_tokens) < 1:
        raise ConfigError("--turns, --repeats, --query-tokens and --answer-tokens must be at least 1")
    if not cfg.weights or len(set(cfg.weights)) != len(cfg.weights):
        raise ConfigError(f"--weights takes distinct formats, got {','.join(cfg.weights) or 'none'}")
    try:
        for fmt in cfg.weights:
            if fmt not in (DEFAULT_WEIGHTS, ROWWISE):
                check_format(fmt)
    except ValueError as exc:
        raise ConfigError(f"{exc} (or {DEFAULT_WEIGHTS}, {ROWWISE})") from None
    resolve_dtype(cfg.dtype, device)
    if set(cfg.weights) - {"fp32", DEFAULT_WEIGHTS} and device.type != "cpu":
        raise ConfigError(f"--weights {','.join(cfg.weights)} is for the CPU (got {device.type})")
    if cfg.baseline not in BASELINES:
        raise ConfigError(f"--baseline must be one of {', '.join(BASELINES)}, got {cfg.baseline!r}")
    if cfg.baseline == "llamacpp":
        if device.type != "cpu" or cfg.temperature > 0:
            raise ConfigError("--baseline llamacpp runs on the CPU, greedy (temperature 0)")
        try:
            check_types(cfg.llamacpp_types)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def run_turns(cfg: TurnsConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the conversation ``cfg.repeats`` times; per-turn medians for every system.

    Systems: RxT once per weight format (``rxt``, then ``rxt_<format>``), the transformers
    baseline (``baseline``), and with ``baseline="llamacpp"`` llama.cpp per GGUF type in both
    modes (``llamacpp_<type>_<mode>``). Within a turn the systems run one after another, so load
    from other processes hits all of them alike.
    """
    config = preset(cfg.preset)
    _check(cfg, config, torch.device(cfg.device))
    if cfg.baseline == "llamacpp":
        check_llama_cpp()  # the typed "install the extra" error before minutes of set-up
    with tempfile.TemporaryDirectory(prefix="rxrt-gguf-") as folder:  # the GGUF files, for the run
        return _run(cfg, config, Path(folder), progress)


def _run(cfg: TurnsConfig, config: RxTConfig, folder: Path, progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Build every system (GGUF files in ``folder``), run them, free llama.cpp's contexts."""
    tokens = config.special_tokens
    device = torch.device(cfg.device)
    rxts, formats = _rxt_models(cfg, config, device)
    model = rxts["rxt"]
    interaction_len = cfg.query_tokens + 3 + cfg.answer_tokens + 1
    n_ctx = cfg.turns * interaction_len + 64
    llama = build_baseline(model, max_positions=n_ctx, seed=cfg.seed)
    peers: list[LlamaCppPeer] = []
    peer_info: dict[str, Any] = {}
    failed: dict[str, str] = {}
    if cfg.baseline == "llamacpp":
        named = {"bos": tokens.bos_id, "eos": tokens.eos_id, "pad": tokens.pad_id, "unk": tokens.unk_id}
        special = {name: i for name, i in named.items() if i is not None}
        peers, peer_info, failed = prepare_peers(
            llama,
            cfg.llamacpp_types,
            n_ctx=n_ctx,
            threads=torch.get_num_threads(),
            special_ids=special,
            workdir=folder,
            timeout_s=cfg.llamacpp_timeout_s,
        )
        for line in failed.values():
            if progress:
                progress(line)
    try:
        return _conversations(cfg, config, rxts, formats, llama, peers, peer_info, failed, progress)
    finally:
        for peer in peers:
            peer.close()


def _conversations(
    cfg: TurnsConfig,
    config: RxTConfig,
    rxts: dict[str, RxTModel],
    formats: list[str],
    llama: Any,
    peers: list[LlamaCppPeer],
    peer_info: dict[str, Any],
    failed: dict[str, str],
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    """The timed part: warm-up, then ``cfg.repeats`` conversations, every system turn by turn.
    A llama.cpp peer whose child fails drops out (``failed`` says how and when); the rest run on."""
    import transformers

    tokens = config.special_tokens
    device = torch.device(cfg.device)
    model = rxts["rxt"]
    batches = {key: DecodeBatch(m, capacity=1) for key, m in rxts.items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    queries = [
        torch.randint(7, config.vocab_size, (cfg.query_tokens,), generator=gen).tolist() for _ in range(cfg.turns)
    ]
    prompts = [[tokens.bos_id, tokens.query_id, *q, tokens.answer_id] for q in queries]

    # Warm-up (untimed): first-call allocations and kernel selection of every system.
    params = SamplingParams(temperature=cfg.temperature, seed=cfg.seed)
    warm = min(8, cfg.answer_tokens)
    for key, m in rxts.items():
        warm_stm = m.init_stm(1, torch.Generator().manual_seed(cfg.seed + 1)).to(device)
        _rxt_turn(m, batches[key], warm_stm, prompts[0], warm, "warm-up", params)
    _baseline_turn(llama, prompts[0], warm, cfg.temperature)
    live = list(peers)

    def drop(peer: LlamaCppPeer) -> None:
        live.remove(peer)
        failed[peer.key] = peer.describe_failure()
        if progress:
            progress(failed[peer.key])

    for peer in list(live):
        try:
            peer.start_conversation("at the warm-up turn")
            peer.turn([], prompts[0], warm, "at the warm-up turn")
        except PeerFailedError:
            drop(peer)

    labels = {key: f"RxT {fmt}" for key, fmt in zip(rxts, formats)}
    labels["baseline"] = "baseline: transformers, history re-read"
    labels.update({p.key: p.label for p in live})
    runs: dict[str, list[list[TurnRecord]]] = {key: [] for key in labels}
    kv_state: dict[str, dict[str, int]] = {}
    load_start = os.getloadavg()
    for r in range(cfg.repeats):
        stms = {key: m.init_stm(1, torch.Generator().manual_seed(cfg.seed)).to(device) for key, m in rxts.items()}
        with torch.inference_mode():  # made when the conversation opens, as the engine does (on its memory thread)
            kvs: dict[str, MemoryKV | None] = {key: m.row_memory_kv(stms[key][0]) for key, m in rxts.items()}
        for peer in list(live):
            try:
                peer.start_conversation(f"at the start of repeat {r + 1}")
            except PeerFailedError:
                drop(peer)
        history: list[int] = []
        records: dict[str, list[TurnRecord]] = {key: [] for key in labels}
        for t, prompt in enumerate(prompts, start=1):
            for key, m in rxts.items():
                turn_key = ("turn", key, r, t)
                rec, _, stms[key], kvs[key] = _rxt_turn(
                    m, batches[key], stms[key], prompt, cfg.answer_tokens, turn_key, params, kvs[key]
                )
                rec.turn = t
                records[key].append(rec)
            context = history + prompt
            base, answer = _baseline_turn(llama, context, cfg.answer_tokens, cfg.temperature)
            base.turn = t
            records["baseline"].append(base)
            for peer in list(live):
                try:
                    ttft, turn_s, _ = peer.turn(history, prompt, cfg.answer_tokens, f"at turn {t} of repeat {r + 1}")
                except PeerFailedError:
                    drop(peer)
                    continue
                rate = (cfg.answer_tokens - 1) / max(turn_s - ttft, 1e-9)
                records[peer.key].append(TurnRecord(t, ttft, turn_s, rate))
            history += [*prompt, *answer, tokens.eos_id]
            if progress:
                times = ", ".join(f"{labels[k]} {v[-1].turn_s:.3f}s" for k, v in records.items() if v)
                progress(f"repeat {r + 1}/{cfg.repeats} turn {t}/{cfg.turns} ({len(context)} tokens): {times}")
        for key, rec_list in records.items():
            runs[key].append(rec_list)
        for peer in list(live):
            if peer.mode == "cached":
                try:
                    kv_state[peer.key] = peer.state()
                except PeerFailedError:
                    drop(peer)
    # A series whose child failed is left out (its turns are incomplete): `failures` says why.
    gone = set(failed)
    labels = {key: label for key, label in labels.items() if key not in gone}
    kv_state = {key: v for key, v in kv_state.items() if key not in gone}
    series = {key: _median_records(v) for key, v in runs.items() if key not in gone}
    stm = stms["rxt"]
    result: dict[str, Any] = {key: [r.to_dict() for r in recs] for key, recs in series.items()}
    result["series"] = labels
    result["failures"] = failed
    result["config"] = {
        **asdict(cfg),
        "weights": formats,
        "weights_requested": cfg.weights,
        "decode_kernels": {key: kernel_label(m) for key, m in rxts.items()},
        "dtype": str(model.dtype).removeprefix("torch."),
        "dtype_requested": cfg.dtype,
        "sampling": ("greedy" if cfg.temperature <= 0 else f"temperature {cfg.temperature}") + ", EOS ignored",
        "rxt_active_parameters": model.active_parameter_count(),
        "baseline_model": "transformers.LlamaForCausalLM, random weights, KV cache within a turn",
        "baseline_active_parameters": active_parameters(llama, config.vocab_size, config.dim),
        "baseline_intermediate_size": llama.config.intermediate_size,
        "baseline_layers": llama.config.num_hidden_layers,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **peer_info,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "c_decode_step": "not used (compiled)" if cfg.compile else c_step_note(model),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
    }
    result["memory"] = {
        "rxt_stm_bytes": stm.numel() * stm.element_size(),
        "rxt_stm": f"{tuple(stm.shape)} {str(stm.dtype).removeprefix('torch.')}, the same at every turn",
        "llamacpp_kv_at_last_turn": kv_state,
        "llamacpp_kv_measure": "llama_state_seq_get_size(ctx, 0) after the last turn: the cache cells the "
        "conversation holds (K and V, every layer, f16) plus a small header; the context reserves n_ctx cells",
    }
    result["summary"] = summarize(result)
    return result


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
