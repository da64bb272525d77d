"""Which RxLM's numbers an RxLM checkpoint reproduces, options the loader refuses, tokenizers that
live elsewhere (``tokenizer=`` / ``--tokenizer``) and checkpoints saved in shards.

RxLM 0.3.80 and 0.3.93 compute different greedy tokens from the same 0.3 checkpoint (0.3.91
stopped shifting decode steps by one RoPE position); config.json does not say which will run
it. rxruntime defaults to the newest (0.3.93) and takes ``rxlm_version`` for the others. The
``beta_published_*`` fixtures hold the same weights saved by both releases (RxT-Beta's shapes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pexpect
import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.beta_full_size import published_config
from rxruntime.models import SamplingParams, generate
from rxruntime.models.checkpoint import HUB_FILES, checkpoint_format, load_config, load_pretrained, save_pretrained
from rxruntime.models.errors import MissingCheckpointFileError, UnsupportedCheckpointError

from .test_repl import spawn_chat
from .test_rxlm_parity import CASES

ROOT = CASES[0].parent.parent


def _case(name: str) -> Path:
    (path,) = [c for c in CASES if f"{c.parent.name}/{c.name}" == name]
    return path


def _copy(case: Path, tmp_path: Path, *, tokenizer: bool = True) -> Path:
    dst = tmp_path / case.name
    shutil.copytree(case, dst)
    if not tokenizer:
        (dst / "tokenizer.json").unlink()
    return dst


def _rxrt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rxruntime.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def _greedy_turn1(case: Path, rxlm_version: str | None, inputs: Path | None = None) -> list[int]:
    """Turn 1's greedy answer of ``case``'s model from the query and STM of ``inputs`` (default
    ``case``): 0.3.80 and 0.3.93 tokenise the same text differently (transformers 4 and 5)."""
    model, _ = load_pretrained(case, load_tokenizer=False, rxlm_version=rxlm_version)
    exp = load_file((inputs or case) / "expected.safetensors")
    query = exp["turn1_query_ids"][0].tolist()
    budget = json.loads(((inputs or case) / "expected.json").read_text())["max_seq_len"] - len(query)
    stm = exp.get("turns_init_stm", exp["stm_init"])[None]
    (answer,) = generate(model, stm, [query], SamplingParams(temperature=0.0), max_new_tokens=budget)
    return answer


# ---------------------------------------------------------------------- releases
def test_the_two_releases_saved_the_same_weights_and_answer_differently() -> None:
    """The premise of the option: one checkpoint, two RxLM releases, two sets of tokens."""
    for mode in ("fast", "extended"):
        old, new = _case(f"0.3.80/beta_published_{mode}"), _case(f"0.3.93/beta_published_{mode}")
        assert (old / "model.safetensors").read_bytes() == (new / "model.safetensors").read_bytes()
        assert json.loads((old / "config.json").read_text()) == json.loads((new / "config.json").read_text())
    answers = {
        v: [load_file(_case(f"{v}/beta_published_{m}") / "expected.safetensors")["turn1_answer_ids"].tolist()
            for m in ("fast", "extended")]
        for v in ("0.3.80", "0.3.93")
    }  # fmt: skip
    assert answers["0.3.80"] != answers["0.3.93"]


def test_the_newest_release_is_the_default_and_the_older_one_is_selectable() -> None:
    for mode in ("fast", "extended"):
        case = _case(f"0.3.80/beta_published_{mode}")  # the same checkpoint as 0.3.93's
        old = load_file(case / "expected.safetensors")["turn1_answer_ids"].tolist()
        new = load_file(_case(f"0.3.93/beta_published_{mode}") / "expected.safetensors")["turn1_answer_ids"].tolist()
        default = load_config(case)
        assert default.rxlm_version == "0.3.93" and default.decoder.step_position_offset == 0
        chosen = load_config(case, "0.3.80")
        assert chosen.rxlm_version == "0.3.80" and chosen.decoder.step_position_offset == 1
        eos = default.special_tokens.eos_id
        for version, expected, inputs in (
            (None, new, _case(f"0.3.93/beta_published_{mode}")),
            ("0.3.80", old, case),
            ("0.3.90", old, case),
            ("0.3.91", new, _case(f"0.3.93/beta_published_{mode}")),
        ):
            answer = _greedy_turn1(case, version, inputs)
            assert answer + [eos] * (len(expected) - len(answer)) == expected, version


@pytest.mark.parametrize("value", ["0.4", "0.3.94", "1.0", "0.3.x", "latest", "0.2.46"])
def test_an_unknown_rxlm_version_is_refused_naming_the_option(value: str) -> None:
    with pytest.raises(UnsupportedCheckpointError, match=rf"rxlm_version={value!r}"):
        load_pretrained(_case("0.3.93/beta_published_fast"), rxlm_version=value)


def test_rxlm_version_forces_the_format_and_is_refused_on_our_own_checkpoint(tmp_path: Path) -> None:
    """Like RXRT_RXLM_VERSION, the option overrides the format detection (which guesses where the
    files do not tell); on a checkpoint that is not RxLM's it has no meaning and is refused."""
    case = _case("0.2.31/alpha_supervised")
    assert checkpoint_format(case) == "RxLM 0.2"
    assert checkpoint_format(case, "0.3.80") == "RxLM 0.3"
    assert load_config(case, "0.3.80").rope_pairing == "adjacent"
    model, tok = load_pretrained(_case("0.3.80/alpha_supervised"))
    save_pretrained(model, tmp_path / "ours", tokenizer=tok)
    with pytest.raises(UnsupportedCheckpointError, match=r"rxlm_version='0.3.80' is for RxLM checkpoints"):
        load_pretrained(tmp_path / "ours", rxlm_version="0.3.80")


def test_the_environment_variable_takes_a_release(monkeypatch: pytest.MonkeyPatch) -> None:
    case = _case("0.3.93/beta_published_fast")
    monkeypatch.setenv("RXRT_RXLM_VERSION", "0.3.80")
    assert load_config(case).decoder.step_position_offset == 1
    assert load_config(case, "0.3.93").decoder.step_position_offset == 0  # the option wins


# ---------------------------------------------------------------------- the published options
def test_beta_published_options_map_to_named_fields() -> None:
    c = load_config(_case("0.3.93/beta_published_fast"))
    d, m = c.decoder, c.memory_attention
    assert (d.num_heads, d.self_q_heads, d.self_kv_heads, d.cross_q_heads, d.cross_kv_heads) == (16, 8, 4, 8, 4)
    assert (d.num_experts, d.experts_per_token, d.num_shared_experts) == (16, 10, 2)
    assert (d.expert_bias_mode, d.shared_expert_bias_mode, d.router_dtype) == ("global", "global", "bfloat16")
    assert (d.layers_before, d.layers_after) == (["dense", "moe"], ["moe", "moe"])
    assert (d.attention_gate, d.cross_attention_gate, d.attention_output_bias) == ("sigmoid", "none", False)
    assert (d.final_norm, c.rope_base, c.encoder.attention_gate) == ("rms", 100000.0, "sigmoid")
    assert (m.variant, m.num_groups, m.gate_type, m.gate_per_slot, m.memory_norm) == (
        "grouped-self-interlayer", 3, "elementwise", True, "rmsnorm"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "router"),
    [
        ({"router_amp": True, "router_dtype": "bfloat16"}, "bfloat16"),
        ({"router_amp": True, "router_dtype": "float16"}, "float16"),
        ({"router_amp": False, "router_dtype": "bfloat16"}, "float32"),  # RxLM autocasts only with router_amp
        ({"router_amp": True, "router_dtype": "float32"}, "float32"),
    ],
)
def test_the_router_precision_follows_router_amp(changes: dict[str, Any], router: str, tmp_path: Path) -> None:
    path = _copy(_case("0.3.80/alpha_supervised"), tmp_path)
    data = json.loads((path / "config.json").read_text())
    data["decoder_config"].update(changes)
    (path / "config.json").write_text(json.dumps(data))
    assert load_config(path).decoder.router_dtype == router


def test_the_bf16_router_routes_as_autocast_does() -> None:
    """Its routing is RxLM's: rounded probabilities, ties broken by the same op; the C step covers
    it (its route_bf16 computes the same routing: tests/test_native_router.py)."""
    from rxruntime.models import native
    from rxruntime.models.moe import MoE

    model, _ = load_pretrained(_case("0.3.93/beta_published_fast"), load_tokenizer=False)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(5, moe.dim, generator=torch.Generator().manual_seed(0))
    weights, experts, _ = moe.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = torch.softmax(torch.nn.functional.linear(x, moe.router.weight), dim=-1)
        top, idx = probs.topk(moe.top_k, dim=-1)
        top = top / (top.sum(-1, keepdim=True) + 1e-9)
    assert weights.dtype == torch.bfloat16 and torch.equal(experts, idx) and torch.equal(weights, top)
    assert native.layout_reason(model) is None


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("decoder_config", "moe_experimental_thing", True),
        ("memory_attention_config", "surprise", 1),
        ("encoder_config", "use_relative_embedding", True),
    ],
)
def test_an_option_no_rxlm_version_has_is_refused_naming_it(
    section: str, key: str, value: object, tmp_path: Path
) -> None:
    path = _copy(_case("0.3.93/beta_published_fast"), tmp_path)
    data = json.loads((path / "config.json").read_text())
    data[section][key] = value
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedCheckpointError, match=rf"{section}\.{key}="):
        load_pretrained(path)


def test_options_that_do_not_change_inference_are_accepted(tmp_path: Path) -> None:
    path = _copy(_case("0.3.93/beta_published_fast"), tmp_path)
    data = json.loads((path / "config.json").read_text())
    data["decoder_config"].update(moe_grouped_gemm=True, moe_use_cutlass_grouped_gemm=True, init_identity_norm=False)
    data["memory_attention_config"].update(norm_init_gate=-2.0, residual_gate_init=3.0, debug_mode=False)
    (path / "config.json").write_text(json.dumps(data))
    assert load_config(path) == load_config(_case("0.3.93/beta_published_fast"))


# ---------------------------------------------------------------------- RxLM 0.2.38-0.2.45
def test_02_checkpoints_with_stateless_layers_are_not_taken_for_03() -> None:
    """0.2.38-0.2.45 saved ``stateless_layers_config`` and ``stateless_layers.*`` (built as
    ClassicTransformerLayer: ``norm2`` is their feed-forward norm, 0.3's is ``norm3``); the
    parity tests prove the numbers against RxLM 0.2.45 itself."""
    case = _case("0.2.45/stateless_layers_02")
    config = json.loads((case / "config.json").read_text())
    assert config["decoder_config"]["stateless_layers_config"] == ["dense", "moe"]
    names = load_file(case / "model.safetensors")
    assert any(n.startswith("decoder.model.stateless_layers.1.norm2.") for n in names)
    assert checkpoint_format(case) == "RxLM 0.2"
    model, _ = load_pretrained(case)
    assert model.config.decoder.layers_before == ["dense", "moe"] and model.config.rope_pairing == "adjacent-split"
    assert model.config.rxlm_version == "0.2.45" and model.config.decoder.step_position_offset == 1
    ours = model.state_dict()
    src = names["decoder.model.stateless_layers.1.norm2.weight"]
    assert torch.equal(ours["decoder.layers.1.ffn_norm.weight"], src)


# ---------------------------------------------------------------------- tokenizers elsewhere, shards, the hub
def test_a_checkpoint_without_its_tokenizer_names_the_option(tmp_path: Path) -> None:
    path = _copy(_case("0.3.93/beta_published_fast"), tmp_path / "model", tokenizer=False)
    with pytest.raises(MissingCheckpointFileError, match="--tokenizer"):
        load_pretrained(path)
    tok_dir = _case("0.3.93/beta_published_fast")
    for where in (tok_dir, tok_dir / "tokenizer.json"):
        _, tok = load_pretrained(path, tokenizer=where)
        _, ref = load_pretrained(tok_dir)
        assert tok is not None and ref is not None
        assert tok.query_ids("What is your name?", "extended") == ref.query_ids("What is your name?", "extended")
    with pytest.raises(MissingCheckpointFileError, match="tokenizer"):
        load_pretrained(path, tokenizer=tmp_path / "nowhere")


def test_the_engine_takes_a_tokenizer_from_elsewhere(tmp_path: Path) -> None:
    import rxruntime

    case = _case("0.3.93/beta_published_fast")
    path = _copy(case, tmp_path, tokenizer=False)
    meta = json.loads((case / "expected.json").read_text())
    exp = load_file(case / "expected.safetensors")
    with rxruntime.load(path, device="cpu", tokenizer=case) as engine:
        conv = engine.conversation(stm=exp["stm_init"], memory_init=meta["system_prompt"])
        assert conv.wait_for_memory(120)
        assert (conv.export_state().stm - exp["turns_init_stm"]).abs().max().item() < 1e-4


def test_sharded_weights_load_as_one_file(tmp_path: Path) -> None:
    case = _case("0.3.93/beta_published_fast")
    path = _copy(case, tmp_path)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert checkpoint_format(path) == "RxLM 0.3"
    exp = load_file(case / "expected.safetensors")
    (a, _), (b, _) = load_pretrained(path), load_pretrained(case)
    with torch.no_grad():
        stm = exp["stm_init"][None]
        assert torch.equal(a.decoder_logits(exp["prompt_ids"], stm), b.decoder_logits(exp["prompt_ids"], stm))


def test_hub_ids_download_every_file_a_model_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub here: snapshot_download is replaced by a local copy, which records what was asked."""
    case = _case("0.3.93/beta_published_fast")
    repos = {"ReactiveAI/RxT-Beta-Supervised": _copy(case, tmp_path / "model", tokenizer=False),
             "ReactiveAI/RxT-Beta": case}  # fmt: skip
    asked: list[tuple[str, list[str]]] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        asked.append((repo_id, list(allow_patterns)))
        return str(repos[repo_id])

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    model, tok = load_pretrained("ReactiveAI/RxT-Beta-Supervised", tokenizer="ReactiveAI/RxT-Beta")
    assert tok is not None and model.config.interaction_template == "beta"
    assert asked == [("ReactiveAI/RxT-Beta-Supervised", HUB_FILES), ("ReactiveAI/RxT-Beta", ["tokenizer.json"])]
    assert {"config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"} <= set(HUB_FILES)


# ---------------------------------------------------------------------- the CLI
def test_info_and_convert_take_the_tokenizer_and_the_release(tmp_path: Path) -> None:
    case = _case("0.3.80/beta_published_fast")
    path = _copy(case, tmp_path / "model", tokenizer=False)
    out = _rxrt("info", "--model", str(path), "--tokenizer", str(case), "--rxlm-version", "0.3.80", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert "RxLM 0.3 format, RxLM 0.3.80's numbers" in info["source"]
    assert info["config"]["decoder"]["step_position_offset"] == 1 and info["tokenizer"]["vocab_size"] == 300
    dst = tmp_path / "converted"
    out = _rxrt("convert", str(path), str(dst), "--tokenizer", str(case), "--rxlm-version", "0.3.80")
    assert out.returncode == 0, out.stderr
    config = json.loads((dst / "config.json").read_text())
    assert config["rxlm_version"] == "0.3.80" and config["decoder"]["step_position_offset"] == 1
    assert (dst / "tokenizer.json").is_file()
    assert _greedy_turn1(dst, None, case) == _greedy_turn1(case, "0.3.80")


@pytest.mark.parametrize(
    "command",
    [
        ["chat"],
        ["serve", "--store", "memory://"],
        ["info"],
        ["eval", "memory", "--dialogues", "1", "--max-gap", "1"],
        ["bench", "replay", "--turns", "1", "--repeats", "1"],
        ["convert", "SRC", "DST"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_every_command_that_loads_a_model_takes_both_options(command: list[str], tmp_path: Path) -> None:
    """The options reach the loader: a release rxruntime does not know and a tokenizer that is not
    there are refused, naming them, by every command that takes ``--model``."""
    path = _copy(_case("0.3.93/beta_published_fast"), tmp_path / "model", tokenizer=False)
    if command[0] == "convert":
        args = ["convert", str(path), str(tmp_path / "out")]
    else:
        args = [*command, "--model", str(path)]
    out = _rxrt(*args, "--rxlm-version", "0.3.99")
    assert out.returncode == 2 and "rxlm_version='0.3.99'" in out.stderr, out.stderr[-2000:]
    if command[0] != "info":  # info reads the config only; it checks a tokenizer when given one
        out = _rxrt(*args)
        assert out.returncode == 2 and "--tokenizer" in out.stderr, out.stderr[-2000:]
    out = _rxrt(*args, "--tokenizer", str(tmp_path / "no-tokenizer-here"))
    assert out.returncode == 2 and "no-tokenizer-here" in out.stderr, out.stderr[-2000:]


def test_chat_runs_beta_with_its_tokenizer_from_elsewhere_and_a_system_prompt(tmp_path: Path) -> None:
    """The issue's finish line, at a small size: ``rxrt chat --model DIR --tokenizer DIR --system TEXT``
    on a checkpoint with RxT-Beta's published options and no tokenizer of its own."""
    import rxruntime

    case = _case("0.3.93/beta_published_fast")
    path = _copy(case, tmp_path / "model", tokenizer=False)
    system, query = "You are a helpful robot.", "Tell me a story about the sea."
    with rxruntime.load(case, device="cpu") as engine:
        conv = engine.conversation("pty", memory_init=system)
        assert conv.wait_for_memory(120)
        expected = conv.ask(query, max_new_tokens=8)
    assert expected.strip()
    args = ("--model", str(path), "--tokenizer", str(case), "--system", system)
    child = spawn_chat(tmp_path, *args, "--max-new-tokens", "8", "--conversation-id", "pty")
    try:
        child.expect("beta template", timeout=240)
        child.expect("you> ")
        child.sendline(query)
        child.expect_exact("rxt> ", timeout=120)
        child.expect("updating memory", timeout=120)
        assert expected.strip() in child.before
        child.expect(r"memory v2 \(\d+ ms\)", timeout=120)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        assert child.wait() == 0
    finally:
        child.close(force=True)


@pytest.mark.parametrize(
    ("section", "kind"),
    [("decoder_config", "decoder"), ("encoder_config", "encoder"), ("memory_attention_config", "memory attention")],
)
def test_a_single_component_repository_is_refused_as_a_training_part(section: str, kind: str, tmp_path: Path) -> None:
    """RxT-Beta-Decoder-Base, RxT-Alpha-Micro-Encoder...: one component's options at the top of
    config.json (as RxLM's component classes save them), not a chat model."""
    case = _case("0.3.93/beta_published_fast")
    path = _copy(case, tmp_path)
    (path / "config.json").write_text(json.dumps(json.loads((case / "config.json").read_text())[section]))
    with pytest.raises(
        UnsupportedCheckpointError, match=rf"an RxLM {kind} alone \(a training part, not a chat model\)"
    ):
        load_pretrained(path)


def _published_beta_config() -> dict[str, Any]:
    """RxT-Beta-Supervised's config.json as issue 23 lists its options: the benchmark's dict (one
    source), with the published decoder's flash-attention flag that the benchmark turns off for RxLM
    on a CPU, and no flag in the encoder and memory attention (RxLM's defaults fill the rest)."""
    cfg = published_config()
    cfg["decoder_config"]["use_flash_attention"] = True
    del cfg["encoder_config"]["use_flash_attention"]
    del cfg["memory_attention_config"]["use_flash_attention"]
    return cfg


def test_the_published_beta_config_maps_to_the_published_sizes(tmp_path: Path) -> None:
    """`rxrt info` on the published options alone (no weights): the decoder is the 2.85B of
    RxT-Beta-Decoder-Base's card, the encoder the 97M of RxT-Beta-Encoder-Base's."""
    (tmp_path / "config.json").write_text(json.dumps(_published_beta_config()))
    out = _rxrt("info", "--model", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert "RxLM 0.3 format, RxLM 0.3.93's numbers" in info["source"]
    counts = info["parameters"]
    assert 2.80e9 < counts["decoder"] < 2.90e9 and 96e6 < counts["encoder"] < 98e6
    d = info["config"]["decoder"]
    assert (d["router_dtype"], d["num_experts"], d["experts_per_token"], d["step_position_offset"]) == (
        "bfloat16", 384, 10, 0
    )  # fmt: skip
    assert info["config"]["tokenizer_template"] == "rxlm-as-written"


def test_serve_ray_refuses_the_options_its_replicas_cannot_take() -> None:
    args = ["serve", "--ray", "--http", "127.0.0.1:8765", "--store", "redis://127.0.0.1:6399/0"]
    out = _rxrt(*args, "--model", "x", "--tokenizer", "y")
    assert out.returncode == 2 and "rxrt convert SRC DST --tokenizer" in out.stderr, out.stderr[-2000:]
