"""The ``rxrt`` commands on an RxLM checkpoint: info, convert (same numbers both ways), chat in a pty."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from safetensors.torch import load_file

from rxruntime.models.checkpoint import checkpoint_format, load_pretrained

from .test_repl import spawn_chat
from .test_rxlm_parity import CASES, SUPPORTED

ALPHA = [c for c in SUPPORTED if c.name == "alpha_supervised"]


def _rxrt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rxruntime.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_alpha_cases_exist() -> None:
    assert len(ALPHA) == 2, f"expected alpha_supervised for both RxLM versions among {CASES}"


@pytest.mark.parametrize("case", ALPHA, ids=lambda c: c.parent.name)
def test_info_names_the_format(case: Path) -> None:
    out = _rxrt("info", "--model", str(case), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert f"RxLM {case.parent.name[:3]}" in info["source"]
    assert info["config"]["rope_pairing"] in ("adjacent", "adjacent-split")


@pytest.mark.parametrize("case", ALPHA, ids=lambda c: c.parent.name)
def test_convert_writes_our_format_with_the_same_numbers(case: Path, tmp_path: Path) -> None:
    dst = tmp_path / "converted"
    out = _rxrt("convert", str(case), str(dst))
    assert out.returncode == 0, out.stderr
    assert checkpoint_format(dst) == "rxruntime"
    assert "decoder_config" not in json.loads((dst / "config.json").read_text())
    exp = load_file(case / "expected.safetensors")
    (a, tok_a), (b, tok_b) = load_pretrained(case), load_pretrained(dst)
    assert tok_a is not None and tok_b is not None
    query = "Tell me a story about the sea."
    assert tok_a.query_ids(query) == tok_b.query_ids(query)
    stm = exp["stm_init"][None]
    with torch.no_grad():
        assert torch.equal(a.decoder_logits(exp["prompt_ids"], stm), b.decoder_logits(exp["prompt_ids"], stm))
        ids = exp["turn1_update_ids"]
        assert torch.equal(a.memory_update(stm, ids), b.memory_update(stm, ids))


def test_convert_refuses_writing_over_its_source(tmp_path: Path) -> None:
    out = _rxrt("convert", str(ALPHA[0]), str(ALPHA[0]))
    assert out.returncode == 2 and "must differ" in out.stdout


@pytest.mark.parametrize("case", ALPHA, ids=lambda c: c.parent.name)
def test_chat_runs_an_rxlm_checkpoint(case: Path, tmp_path: Path) -> None:
    child = spawn_chat(tmp_path, "--model", str(case), "--max-new-tokens", "8")
    try:
        child.expect("/help for commands", timeout=240)  # start-up (and the C step's build) on a busy machine
        child.expect("you> ")
        child.sendline("Tell me a story about the sea.")
        child.expect("rxt> ", timeout=120)
        child.expect("updating memory", timeout=120)
        child.expect(r"memory v1 \(\d+ ms\)", timeout=120)
        child.expect("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        assert child.wait() == 0
    finally:
        child.close(force=True)


@pytest.mark.parametrize("mode", ["fast", "extended"])
def test_chat_runs_a_beta_checkpoint_in_its_template_with_readable_text(mode: str, tmp_path: Path) -> None:
    """`rxrt chat --system ... --thinking MODE` on an RxTBeta 0.3 checkpoint: the system prompt is
    read into memory in Beta's template and the REPL prints what the engine answers for the same
    conversation, as text (no byte symbols such as 'Ġ')."""
    import rxruntime

    (case,) = [c for c in SUPPORTED if f"{c.parent.name}/{c.name}" == f"0.3.80/beta_system_{mode}"]
    system, query = "You are a helpful robot.", "Tell me a story about the sea."
    with rxruntime.load(case, device="cpu") as engine:
        conv = engine.conversation("pty", memory_init=system)
        assert conv.wait_for_memory(120)
        expected = conv.ask(query, max_new_tokens=8, thinking_mode=mode)
    assert expected.strip() and "Ġ" not in expected
    args = ("--model", str(case), "--max-new-tokens", "8", "--conversation-id", "pty", "--system", system)
    child = spawn_chat(tmp_path, *args, "--thinking", mode)
    try:
        child.expect(f"beta template \\({mode}\\)", timeout=240)
        child.expect("/help for commands")
        child.expect("you> ")
        child.sendline(query)
        child.expect_exact("rxt> [thinking] " if mode == "extended" else "rxt> ", timeout=120)
        child.expect("updating memory", timeout=120)
        printed = child.before
        assert expected.strip() in printed and "Ġ" not in printed
        child.expect(r"memory v2 \(\d+ ms\)", timeout=120)  # v1 was the system prompt
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        assert child.wait() == 0
    finally:
        child.close(force=True)


def test_chat_refuses_a_thinking_mode_the_model_lacks() -> None:
    (case,) = [c for c in ALPHA if c.parent.name == "0.3.80"]
    out = _rxrt("chat", "--model", str(case), "--thinking", "extended")
    assert out.returncode == 2
    assert "thinking_mode: must be one of ('fast',) for interaction_template='alpha'" in out.stderr
