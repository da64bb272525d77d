"""RxTBeta's own message template (``interaction_template: beta``) and RxLM tokenizers' decoding.

The numbers are proven against RxLM in test_rxlm_parity.py (cases ``beta_system_*``); here: which
checkpoints get which template, what a model without a mode refuses and how, that the template
survives ``rxrt convert``, and that a tokenizer.json decodes to readable text with and without
the byte-level decoder RxLM's trainer leaves out.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

import rxruntime
from rxruntime.errors import InvalidOptionError
from rxruntime.models.checkpoint import load_config, load_pretrained
from rxruntime.models.errors import ConfigError

from .test_rxlm_parity import CASES

BETA = "0.3.80/beta_system_fast"
ALPHA = "0.3.80/alpha_supervised"


def _case(name: str) -> Path:
    (path,) = [c for c in CASES if f"{c.parent.name}/{c.name}" == name]
    return path


@pytest.mark.parametrize(
    ("name", "template"),
    [
        (BETA, "beta"),
        ("0.3.80/beta_gqa_mqa_elementwise", "beta"),
        ("0.2.31/beta_gqa_mqa_elementwise", "alpha"),  # RxLM 0.2's RxTBeta uses RxTAlpha's template
        (ALPHA, "alpha"),
        ("0.2.31/alpha_supervised", "alpha"),
    ],
)
def test_the_template_follows_the_rxlm_class_and_version(name: str, template: str) -> None:
    config = load_config(_case(name))
    assert config.interaction_template == template
    if template == "beta":
        assert config.system_prompt_title == "SYSTEM INSTRUCTIONS"
        assert config.special_tokens.internal_id is not None and config.special_tokens.think_id is not None


def test_beta_prompts_end_with_the_mode_token_and_system_text_is_rxtbetas() -> None:
    _, tok = load_pretrained(_case(BETA), load_tokenizer=True)
    assert tok is not None
    s = tok.special
    fast, extended = tok.query_ids("Hi there", "fast"), tok.query_ids("Hi there", "extended")
    assert fast[:-1] == extended[:-1] and fast[:2] == [s.bos_id, s.query_id]
    assert (fast[-1], extended[-1]) == (s.answer_id, s.think_id)
    system = tok.system_ids("be kind.")
    assert system[:2] == [s.bos_id, s.internal_id] and system[-1] == s.eos_id
    assert system == tok.encode("[BOS][I]SYSTEM INSTRUCTIONS\n\nbe kind.[EOS]")  # one string, as RxTBeta
    assert tok.decode(system).endswith("\n\nbe kind.")  # (the tiny fixture vocabulary lacks S, N, U)


def test_config_refuses_unknown_templates_and_a_beta_template_without_its_tokens() -> None:
    config = load_config(_case(BETA))
    with pytest.raises(ConfigError, match=r"interaction_template must be one of .* got 'gamma'"):
        dataclasses.replace(config, interaction_template="gamma")  # type: ignore[arg-type]
    no_internal = dataclasses.replace(config.special_tokens, internal_id=None)
    with pytest.raises(ConfigError, match=r"interaction_template='beta' needs special_tokens.internal_id"):
        dataclasses.replace(config, special_tokens=no_internal)


@pytest.mark.parametrize(
    ("name", "mode", "message"),
    [
        (BETA, "auto", r"thinking_mode.*'auto' is not supported"),
        (BETA, "slow", r"thinking_mode.*must be one of \('fast', 'extended'\).*got 'slow'"),
        (ALPHA, "extended", r"thinking_mode.*must be one of \('fast',\) for interaction_template='alpha'"),
    ],
)
def test_an_unsupported_thinking_mode_is_refused_naming_it(name: str, mode: str, message: str) -> None:
    with rxruntime.load(_case(name), device="cpu") as engine:
        conv = engine.conversation()
        with pytest.raises(InvalidOptionError, match=message) as err:
            conv.interact("Hello", thinking_mode=mode)
        assert err.value.field == "thinking_mode"
        with pytest.raises(InvalidOptionError, match=message):
            conv.ask("Hello", thinking_mode=mode)
        assert conv.ask("Hello", max_new_tokens=2, thinking_mode="fast")  # the conversation is unharmed


def test_convert_records_the_template(tmp_path: Path) -> None:
    dst = tmp_path / "converted"
    out = subprocess.run(
        [sys.executable, "-m", "rxruntime.cli", "convert", str(_case(BETA)), str(dst)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    written = json.loads((dst / "config.json").read_text())
    assert written["interaction_template"] == "beta"
    assert written["system_prompt_title"] == "SYSTEM INSTRUCTIONS"
    assert written["special_tokens"]["internal_id"] == 9
    (_, a), (_, b) = load_pretrained(_case(BETA)), load_pretrained(dst)
    assert a is not None and b is not None
    assert b.interaction_template == "beta"
    assert a.system_ids("Be kind.") == b.system_ids("Be kind.")
    assert a.query_ids("Hi", "extended") == b.query_ids("Hi", "extended")


def _without_decoder(case: Path, tmp_path: Path) -> Path:
    """The case as RxLM's TokenizerTrainer writes tokenizer.json: ``"decoder": null``."""
    dst = tmp_path / case.name
    shutil.copytree(case, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    data["decoder"] = None
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("decoder", ["ByteLevel", None])
def test_decoded_text_round_trips_with_or_without_a_decoder(decoder: str | None, tmp_path: Path) -> None:
    case = _case(BETA) if decoder else _without_decoder(_case(BETA), tmp_path)
    _, tok = load_pretrained(case)
    assert tok is not None
    text = "Tell me a story about the sea.\nWhat is your name?"
    assert json.loads(tok.tokenizer.decoder.__getstate__())["type"] == "ByteLevel"
    assert tok.decode(tok.encode(text)) == text
    stream = tok.incremental_decoder()
    assert "".join(stream.push(i) for i in tok.encode(text)) + stream.flush() == text


def test_engine_answers_are_readable_without_a_decoder_in_the_file(tmp_path: Path) -> None:
    """Before the fix, a loaded RxLM tokenizer.json decoded to byte symbols ('Ġ' for spaces)."""
    case = _without_decoder(_case(ALPHA), tmp_path)
    raw = Tokenizer.from_file(str(case / "tokenizer.json"))
    assert "Ġ" in raw.decode(raw.encode("the sea").ids)  # the file alone shows byte symbols
    torch.manual_seed(0)
    with rxruntime.load(case, device="cpu") as engine:
        answer = engine.conversation(seed=1).ask("Tell me a story about the sea.", max_new_tokens=12)
    assert answer and "Ġ" not in answer and "Ċ" not in answer


@pytest.mark.parametrize("nested", [False, True])
def test_a_byte_level_tokenizer_without_decoder_gets_one_and_others_keep_theirs(nested: bool) -> None:
    from tokenizers import decoders, pre_tokenizers

    from rxruntime.models.tokenizer import RxTokenizer

    tok = RxTokenizer.train(["the sea is calm and the wind is soft"] * 4, vocab_size=300).tokenizer
    tok.decoder = None
    if nested:  # GPT-style: a split, then the byte mapping
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel()])
    assert "Ġ" in tok.decode(tok.encode("the sea").ids)
    assert RxTokenizer(tok).decode(tok.encode("the sea").ids) == "the sea"
    kept = decoders.Metaspace()
    tok.decoder = kept
    RxTokenizer(tok)
    assert json.loads(tok.decoder.__getstate__())["type"] == "Metaspace"  # a decoder the file has is kept
