"""RxLM checkpoints load as they are and compute exactly what RxLM computed with them.

The fixtures (tests/fixtures/rxlm/<rxlm-version>/<case>/, written by benchmarks/rxlm_env/rxlm_fixtures.py
inside RxLM's own environments) hold a model directory exactly as RxLM's ``save_pretrained``
wrote it and RxLM's outputs for fixed inputs. For every case: the decoder logits of a prompt,
three greedy ``interact`` turns (identical tokens; the STM after each memory update), and the
STM initialised from text, all within 1e-4 in float32. Each case loads with the RxLM release
that wrote it (``rxlm_version``): 0.3.80 and 0.3.93 compute different tokens from the same
checkpoint. ``RXRT_RXLM_FIXTURES`` points the tests at another fixture folder while developing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from rxruntime.models import RxTModel, SamplingParams, generate
from rxruntime.models.checkpoint import checkpoint_format, load_pretrained

ROOT = Path(os.environ.get("RXRT_RXLM_FIXTURES", Path(__file__).parent / "fixtures" / "rxlm"))
CASES = sorted(p.parent for p in ROOT.glob("*/*/expected.json"))
TOL = 1e-4


def _stm_close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Within TOL relative to the memory's scale: the STM grows over turns (values of 5 are
    common by turn 3) and float32 sums in another order (another CPU's kernels) drift with it."""
    scale = max(1.0, theirs.abs().max().item())
    return (ours - theirs).abs().max().item() < TOL * scale


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def test_fixtures_are_present() -> None:
    """The parity suite must not pass by finding nothing: both RxLM versions have cases."""
    versions = {p.parent.name for p in CASES}
    assert {"0.2.31", "0.2.45", "0.3.80", "0.3.93"} <= versions, (
        f"no RxLM fixtures under {ROOT} (found {sorted(versions)})"
    )


def _expected(case: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(case / "expected.safetensors"), json.loads((case / "expected.json").read_text())


def _version(case: Path) -> str:
    """The RxLM release that wrote (and ran) the case: the fixture's folder."""
    return case.parent.name


def _load(case: Path) -> RxTModel:
    model, _ = load_pretrained(case, load_tokenizer=False, rxlm_version=_version(case))
    assert model.config.rxlm_version == _version(case)
    return model


SUPPORTED = CASES  # every fixture case is an option set rxruntime computes (refusals: test_rxlm_format.py)


@pytest.mark.parametrize("case", SUPPORTED, ids=_id)
def test_decoder_logits_match(case: Path) -> None:
    exp, meta = _expected(case)
    assert meta["rxlm_version"] == _version(case)
    assert checkpoint_format(case) == f"RxLM {'.'.join(meta['rxlm_version'].split('.')[:2])}"
    model = _load(case)
    with torch.no_grad():
        logits = model.decoder_logits(exp["prompt_ids"], exp["stm_init"][None])
    assert (logits - exp["prompt_logits"]).abs().max().item() < TOL


def _turns_start(exp: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where turn 1 starts: stm_init, or (RxTBeta system-prompt cases) what the system prompt wrote."""
    return exp.get("turns_init_stm", exp["stm_init"])


def _turns(model: RxTModel, exp: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Three greedy turns through our generation and memory update, compared turn by turn."""
    stm = _turns_start(exp)[None].clone()
    eos = model.config.special_tokens.eos_id
    for i in (1, 2, 3):
        query = exp[f"turn{i}_query_ids"][0].tolist()
        budget = meta["max_seq_len"] - len(query)  # interact's limit on query + answer
        (answer,) = generate(model, stm, [query], SamplingParams(temperature=0.0), max_new_tokens=budget)
        closed = len(answer) < budget  # stopped at [EOS], which RxLM yields and encodes
        expected = exp[f"turn{i}_answer_ids"].tolist()
        assert answer + ([eos] if closed else []) == expected, f"turn {i}"
        ids = torch.tensor([query + expected])
        assert torch.equal(ids, exp[f"turn{i}_update_ids"])
        with torch.no_grad():
            stm = model.memory_update(stm, ids)
        assert _stm_close(stm[0], exp[f"turn{i}_stm"]), f"STM after turn {i}"


@pytest.mark.parametrize("case", SUPPORTED, ids=_id)
def test_three_turns_match(case: Path) -> None:
    exp, meta = _expected(case)
    _turns(_load(case), exp, meta)


@pytest.mark.parametrize("case", SUPPORTED, ids=_id)
def test_stm_from_text_matches(case: Path) -> None:
    exp, meta = _expected(case)
    model, tokenizer = load_pretrained(case, rxlm_version=_version(case))
    assert tokenizer is not None
    ids = exp["stm_from_text_ids"]
    text = meta["stm_init_text"]
    if isinstance(text, list):  # RxTAlpha, RxTBeta 0.2: a whole interaction; RxTBeta 0.3: its system prompt
        assert tokenizer.interaction_ids(*text) == ids[0].tolist()
    else:
        assert tokenizer.interaction_template == "beta"
        assert tokenizer.system_ids(text) == ids[0].tolist()
    for i, query in enumerate(meta["queries"], start=1):
        assert tokenizer.query_ids(query, meta["thinking_mode"]) == exp[f"turn{i}_query_ids"][0].tolist()
    with torch.no_grad():
        stm = model.memory_update(exp["stm_init"][None], ids)
    assert _stm_close(stm[0], exp["stm_from_text"])


ENGINE_NAMES = ("alpha_supervised", "beta_system_fast", "beta_system_extended", "beta_published_fast")
ENGINE_CASES = [c for c in SUPPORTED if c.name in (*ENGINE_NAMES, "beta_published_extended")]


def test_beta_template_cases_exist() -> None:
    """RxTBeta 0.3's own template is proven on a system prompt in both thinking modes, and RxT-Beta's
    published shapes in both modes by both RxLM releases (0.3.80 with the decode-step position shift,
    0.3.93 without)."""
    modes = {_expected(c)[1]["thinking_mode"] for c in ENGINE_CASES if "system_prompt" in _expected(c)[1]}
    assert modes == {"fast", "extended"}
    published = {(_version(c), _expected(c)[1]["thinking_mode"]) for c in CASES if c.name.startswith("beta_published")}
    assert published == {(v, m) for v in ("0.3.80", "0.3.93") for m in ("fast", "extended")}


@pytest.mark.parametrize("case", ENGINE_CASES, ids=_id)
def test_three_turns_through_the_engine_match(case: Path) -> None:
    """The same turns as text through rxruntime.load and the Engine (batching, decode loop,
    memory thread), starting from RxLM's STM: identical tokens, STM within 1e-4. RxTBeta cases
    first read their system prompt into that STM (``memory_init``) and run their thinking mode."""
    import threading

    import rxruntime
    from rxruntime.events import AnswerCompleted

    exp, meta = _expected(case)
    options: dict[str, Any] = {}
    if meta["thinking_mode"] is not None:
        options["thinking_mode"] = meta["thinking_mode"]
    with rxruntime.load(case, device="cpu", rxlm_version=_version(case)) as engine:
        eos = engine.config.special_tokens.eos_id
        conv = engine.conversation(stm=exp["stm_init"], memory_init=meta.get("system_prompt"))
        if "system_prompt" in meta:
            assert engine.config.interaction_template == "beta"
            assert conv.wait_for_memory(120)
            assert _stm_close(conv.export_state().stm, exp["turns_init_stm"])
        for i, query in enumerate(meta["queries"], start=1):
            budget = meta["max_seq_len"] - exp[f"turn{i}_query_ids"].shape[1]
            done = threading.Event()
            answers: list[AnswerCompleted] = []

            def on_next(event: object, answers: list[AnswerCompleted] = answers) -> None:
                if isinstance(event, AnswerCompleted):
                    answers.append(event)

            def on_error(exc: Exception, done: threading.Event = done) -> None:
                done.set()

            turn = conv.interact(query, temperature=0.0, max_new_tokens=budget, **options)
            turn.subscribe(on_next, on_error, done.set)
            assert done.wait(120) and answers, f"turn {i} did not complete"
            (answer,) = answers
            ended = [eos] if answer.finish_reason == "eos" else []
            assert list(answer.token_ids) + ended == exp[f"turn{i}_answer_ids"].tolist(), f"turn {i}"
            state = conv.export_state()
            assert _stm_close(state.stm, exp[f"turn{i}_stm"]), f"STM after turn {i}"


C_STEP_CASES = {  # the layouts the C step must cover: every one here (RxT-Alpha's, RxT-Beta's...)
    f"{version}/{name}"
    for version in ("0.2.31", "0.3.80")
    for name in (
        "adaptive_norm_plain_residual", "alpha_supervised", "beta_gqa_mqa_elementwise", "elementwise_linear_status",
        "interlayer_static_tanh", "legacy_encoder_cross_attention", "mha_layernorm_dense",
        "positional_norm_linear_status", "variant_simple",
    )
} | {
    f"0.3.80/{name}"
    for name in (
        "beta_stateless_shared_experts", "beta_system_extended", "beta_system_fast", "gated_attention_no_out_bias",
        "grouped_self_interlayer", "moe_legacy_layout", "moe_no_bias_no_shared", "moe_two_shared_local_bias",
    )
} | {"0.2.45/stateless_layers_02"}  # fmt: skip
BF16_ROUTER = {f"{v}/{n}" for v in ("0.3.80", "0.3.93") for n in ("beta_published_fast", "beta_published_extended")}
"""RxT-Beta as published: its bf16 router (RxLM's router_amp), which the C step computes as RxLM
does (decode_step.c's route_bf16); its logits must match RxLM's like every other layout's."""


@pytest.mark.parametrize("case", SUPPORTED, ids=_id)
def test_decode_paths_agree(case: Path) -> None:
    """The module path, the fused torch step (decode layout) and the C step give RxLM's step
    logits on RxLM's layouts; where the C step does not cover a layout it declines with a reason
    instead of computing something else."""
    from rxruntime.models import native

    exp, _ = _expected(case)
    model = _load(case)
    reason = native.layout_reason(model)
    if _id(case) in C_STEP_CASES or _id(case) in BF16_ROUTER:
        assert reason is None
    else:
        assert reason is not None and "not covered" in reason
    n = min(6, exp["turn1_answer_ids"].shape[0] - 1)  # tokens fed back; each gives the next's logits
    answer = exp["turn1_answer_ids"][:n]
    query = exp["turn1_query_ids"]
    stm = _turns_start(exp)[None]
    outputs = []
    for path in ("modules", "torch step", "C step"):
        model.fast_decode = path != "modules"
        model.native_decode = path == "C step"
        if path != "modules":
            model.use_decode_layout()
        cache = model.new_cache(1)
        with torch.no_grad():
            kv = [(k.contiguous(), v.contiguous()) for k, v in model.memory_kv(stm)]  # as DecodeBatch keeps them
            model.prefill(query, torch.tensor([query.shape[1]]), kv, cache)
            steps = []
            for j, token in enumerate(answer.tolist()):
                position = torch.tensor([query.shape[1] + j])
                if path == "C step":
                    logits = native.decode_step(model, torch.tensor([token]), position, kv, cache)
                    if reason is not None or not native.enabled():
                        assert logits is None
                        break
                    assert logits is not None
                else:
                    logits = model.decode_step(torch.tensor([token]), position, kv, cache)
                steps.append(logits)
        if steps:
            outputs.append((path, torch.cat(steps)))
    assert n > 0
    for path, logits in outputs:  # RxLM's logits for turn 1's tokens 2..n+1
        assert (logits - exp["turn1_step_logits"][1 : n + 1]).abs().max().item() < TOL, path


BETA_LAYOUTS = [c for c in SUPPORTED if c.parent.name.startswith("0.3") and "beta" in c.name]


@pytest.mark.parametrize("case", BETA_LAYOUTS, ids=_id)
def test_c_step_runs_beta_layouts_and_says_so(case: Path) -> None:
    """RxT-Beta's RxLM 0.3 layouts (stateless layers, shared experts, global biases, gated
    attention, LayerNorm head norm) are the C step's: the benchmarks' ``c_decode_step`` note says
    it ran (test_decode_paths_agree proves its logits against RxLM's)."""
    from rxruntime.bench.decode import c_step_note
    from rxruntime.models import native

    model = _load(case)
    assert native.layout_reason(model) is None
    unavailable = native.unavailable_reason()
    used = f"used for steps of up to {native.MULTI_ROW_MAX_ROWS} rows"  # float32 runs the multi-row kernel
    assert c_step_note(model) == (used if unavailable is None else f"not used: {unavailable}")
