"""The RxLM parity fixtures keep their contract (tests/fixtures/rxlm/README.md).

They are written by benchmarks/rxlm_env/rxlm_fixtures.py inside RxLM's own environments, which CI does not
have; these checks hold the committed files to what the parity tests rely on: every record is
present with the shapes the config implies, the turns are consistent with one another (the
memory update read exactly the query and the answer, greedy picked each step's argmax), and the
committed tokenizer.json, read with the ``tokenizers`` library alone, gives the ids RxLM fed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers

ROOT = Path(__file__).parent / "fixtures" / "rxlm"
CASES = sorted(p.parent for p in ROOT.glob("*/*/expected.json"))


def _case_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def test_the_matrix_covers_both_rxlm_versions() -> None:
    versions = {p.parent.name for p in CASES}
    assert versions == {"0.2.31", "0.2.45", "0.3.80", "0.3.93"}
    assert len(CASES) >= 15


def test_fixtures_stay_small() -> None:
    """Committed files: git stores equal contents once, so the distinct ones are what counts. The
    ``beta_published_*`` cases (RxT-Beta's shapes) share one model file across modes and releases."""
    distinct = {f.read_bytes() for f in ROOT.rglob("*") if f.is_file()}
    assert sum(len(b) for b in distinct) < 9 * 1024 * 1024
    published = {(case / "model.safetensors").read_bytes() for case in CASES if case.name.startswith("beta_published")}
    assert len(published) == 1 and len(next(iter(published))) < 1536 * 1024
    for case in CASES:
        if not case.name.startswith("beta_published"):
            assert (case / "model.safetensors").stat().st_size < 300 * 1024, case


@pytest.fixture(params=CASES, ids=_case_id)
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    return {
        "path": path,
        "config": json.loads((path / "config.json").read_text()),
        "meta": json.loads((path / "expected.json").read_text()),
        "expected": load_file(str(path / "expected.safetensors")),
    }


def test_model_dir_is_what_rxlm_saves(case: dict[str, Any]) -> None:
    config = case["config"]
    for key in ("decoder_config", "encoder_config", "memory_attention_config", "tokenizer_config"):
        assert isinstance(config[key], dict), key
    weights = load_file(str(case["path"] / "model.safetensors"))
    dec = config["decoder_config"]
    assert weights["decoder.model.head.weight"].shape == (dec["vocab_size"], dec["embed_dim"])
    assert weights["encoder.model.embedding.weight"].shape == (dec["vocab_size"], dec["embed_dim"])
    assert (case["path"] / "tokenizer.json").is_file()


def test_records_have_the_contract_shapes(case: dict[str, Any]) -> None:
    exp, config = case["expected"], case["config"]
    mem = config["memory_attention_config"]
    stm_shape = (mem["num_layers"], mem["stm_size"], mem["embed_dim"])
    vocab = config["decoder_config"]["vocab_size"]
    for key in ("stm_init", "stm_from_text", "turn1_stm", "turn2_stm", "turn3_stm"):
        assert exp[key].shape == stm_shape and exp[key].dtype == torch.float32, key
    t = exp["prompt_ids"].shape[1]
    assert exp["prompt_ids"].dtype == torch.int64
    assert exp["prompt_logits"].shape == (1, t, vocab)
    assert torch.isfinite(exp["prompt_logits"]).all()
    for i in (1, 2, 3):
        assert exp[f"turn{i}_query_ids"].dtype == torch.int64
        assert exp[f"turn{i}_answer_ids"].dtype == torch.int64
    # each memory update changed the STM, and turns chain (turn 2 starts where turn 1 ended)
    assert not torch.equal(exp["turn1_stm"], exp["stm_init"])
    assert not torch.equal(exp["turn2_stm"], exp["turn1_stm"])
    assert not torch.equal(exp["stm_from_text"], exp["stm_init"])


def test_turns_are_consistent(case: dict[str, Any]) -> None:
    exp, meta, tokens = case["expected"], case["meta"], case["config"]["tokenizer_config"]
    limit = meta["max_seq_len"]
    for i in (1, 2, 3):
        query = exp[f"turn{i}_query_ids"][0].tolist()
        answer = exp[f"turn{i}_answer_ids"].tolist()
        assert query[:2] == [tokens["bos_token_id"], tokens["query_token_id"]]
        assert query[-1] == _mode_token(case)
        assert answer and min(answer) >= 0
        # the memory update encoded the query and every sampled token, nothing else
        assert exp[f"turn{i}_update_ids"][0].tolist() == query + answer
        # interact stops on [EOS] or at the length limit, never elsewhere
        eos = tokens["eos_token_id"]
        assert eos not in answer[:-1]
        assert answer[-1] == eos or len(query) + len(answer) == limit
    steps = exp["turn1_step_logits"]
    assert steps.argmax(-1).tolist() == exp["turn1_answer_ids"].tolist()


def _mode_token(case: dict[str, Any]) -> int:
    """The token interact appended to the query: [A], or [T] for RxTBeta's 'extended' mode."""
    tokens = case["config"]["tokenizer_config"]
    return int(tokens["think_token_id" if case["meta"].get("thinking_mode") == "extended" else "answer_token_id"])


def test_system_prompt_cases_start_their_turns_from_it(case: dict[str, Any]) -> None:
    """RxTBeta cases with a system prompt first: turn 1 reads the STM init_stm_state wrote."""
    meta, exp = case["meta"], case["expected"]
    if "system_prompt" not in meta:
        assert "turns_init_stm" not in exp
        return
    assert meta["class"] == "RxTBeta" and meta["stm_init_text"] == meta["system_prompt"]
    assert torch.equal(exp["turns_init_stm"], exp["stm_from_text"])  # the same system prompt, same start


def test_tokenizer_json_decodes_text_as_written(case: dict[str, Any]) -> None:
    """The fixtures' tokenizer.json has the byte-level decoder: text comes back as written,
    without the byte symbols ('Ġ' for a space) a byte-level BPE shows without it."""
    tok = Tokenizer.from_file(str(case["path"] / "tokenizer.json"))
    assert json.loads(tok.decoder.__getstate__())["type"] == "ByteLevel"
    for text in [*case["meta"]["queries"], "Tell me: one, two\nthree."]:
        decoded = tok.decode(tok.encode(text, add_special_tokens=False).ids)
        assert "Ġ" not in decoded and "Ċ" not in decoded
        assert decoded.strip() == text


def test_tokenizer_json_alone_gives_rxlm_ids(case: dict[str, Any]) -> None:
    """What a loader without transformers must do: '[BOS][Q]' + text, no added special tokens, and
    the rule of the transformers RxLM ran under. transformers 4 (RxLM up to 0.3.80:
    PreTrainedTokenizerFast) sets the pre-tokenizer's ``add_prefix_space`` to False, so the first
    word after [Q] is 'T' 'ell'; transformers 5 (RxLM 0.3.81 on) keeps the file's True: 'ĠTell'."""
    tok = Tokenizer.from_file(str(case["path"] / "tokenizer.json"))
    state = json.loads(tok.pre_tokenizer.__getstate__())
    assert state["type"] == "ByteLevel" and state["add_prefix_space"] is True  # as RxLM's trainer writes it
    state.pop("type")
    meta, exp = case["meta"], case["expected"]
    line, patch = meta["rxlm_version"].rsplit(".", 1)
    transformers5 = line == "0.3" and int(patch) >= 81
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(**{**state, "add_prefix_space": transformers5})
    for i, text in enumerate(meta["queries"], start=1):
        ids = tok.encode(f"[BOS][Q]{text}", add_special_tokens=False).ids
        assert [*ids, _mode_token(case)] == exp[f"turn{i}_query_ids"][0].tolist()
    if meta["class"] == "RxTAlpha" or meta["rxlm_version"].startswith("0.2"):
        q, a = meta["stm_init_text"]
        ids = tok.encode(f"[BOS][Q]{q}[A]{a}[EOS]", add_special_tokens=False).ids
    else:
        ids = tok.encode(f"[BOS][I]SYSTEM INSTRUCTIONS\n\n{meta['stm_init_text']}[EOS]", add_special_tokens=False).ids
    assert ids == exp["stm_from_text_ids"][0].tolist()
