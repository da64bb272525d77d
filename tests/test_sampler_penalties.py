"""Presence and frequency penalties (OpenAI's meaning): a token already in the answer has its
logit lowered, once (presence) or once per occurrence (frequency), per row of a batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rxruntime.engine import Engine
from rxruntime.errors import InvalidOptionError
from rxruntime.models import SamplingParams
from rxruntime.models.config import preset
from rxruntime.models.errors import ConfigError
from rxruntime.models.sampler import BatchSampler
from rxruntime.models.tokenizer import RxTokenizer
from rxruntime.options import check_options
from rxruntime.snapshot import config_fingerprint
from training.recipe import ModelSpec, load_recipe

from .engine_util import make_model


def _logits(rows: int, favourites: dict[int, float], vocab: int = 12) -> torch.Tensor:
    out = torch.zeros(rows, vocab)
    for token, logit in favourites.items():
        out[:, token] = logit
    return out


def _run(sampler: BatchSampler, logits: torch.Tensor, steps: int) -> list[list[int]]:
    picked = []
    for step in range(steps):
        picked.append(sampler.sample_rows(logits, torch.full((logits.shape[0],), step), 0, logits.shape[0]).tolist())
    return [list(r) for r in zip(*picked)]


def test_presence_lowers_a_used_token_once_and_only_in_its_row() -> None:
    sampler = BatchSampler(2)
    sampler.set_row(0, SamplingParams(temperature=0.0, presence_penalty=2.0), 0)
    sampler.set_row(1, SamplingParams(temperature=0.0), 0)
    rows = _run(sampler, _logits(2, {5: 10.0, 6: 9.0}), 4)
    assert rows[0] == [5, 6, 5, 5]  # 5 at 8 < 6 at 9, then 6 at 7 < 5 at 8: once used, each stays lowered by 2
    assert rows[1] == [5, 5, 5, 5]


def test_frequency_lowers_a_token_once_per_occurrence() -> None:
    sampler = BatchSampler(1)
    sampler.set_row(0, SamplingParams(temperature=0.0, frequency_penalty=1.0), 0)
    assert _run(sampler, _logits(1, {5: 10.0, 6: 8.5}), 4)[0] == [5, 5, 6, 5]  # 9 > 8.5, 8 < 8.5, 8 > 7.5


def test_a_new_row_starts_with_no_counts_and_a_copied_row_keeps_them() -> None:
    sampler = BatchSampler(2)
    sampler.set_row(0, SamplingParams(temperature=0.0, presence_penalty=2.0), 0)
    sampler.set_row(1, SamplingParams(temperature=0.0, presence_penalty=2.0), 0)
    logits = _logits(2, {5: 10.0, 6: 9.0})
    _run(sampler, logits, 1)  # both rows used 5
    sampler.copy_row(0, 1)
    sampler.set_row(0, SamplingParams(temperature=0.0, presence_penalty=2.0), 0)
    assert _run(sampler, logits, 1) == [[5], [6]]


def test_penalties_are_checked_options() -> None:
    turn = check_options(SamplingParams(), 100, {"presence_penalty": 0.5, "frequency_penalty": -1})
    assert (turn.params.presence_penalty, turn.params.frequency_penalty) == (0.5, -1.0)
    with pytest.raises(InvalidOptionError, match="presence_penalty"):
        check_options(SamplingParams(), 100, {"presence_penalty": 2.5})
    with pytest.raises(ConfigError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=-3.0)


def test_a_models_config_sets_the_default_penalties_and_turn_options_keep_them(tok: RxTokenizer) -> None:
    """``config.json``'s penalties are what a turn that sets none gets (the default model ships 0.5
    each); a turn that sets only its temperature keeps them; a turn's own penalty replaces one."""
    model = make_model()
    model.config = dataclasses.replace(model.config, presence_penalty=0.5, frequency_penalty=0.25)
    with Engine(model, tok) as engine:
        assert (engine.default_sampling.presence_penalty, engine.default_sampling.frequency_penalty) == (0.5, 0.25)
        turn = check_options(engine.default_sampling, engine.vocab_size, {"temperature": 0.7, "frequency_penalty": 0})
        assert (turn.params.presence_penalty, turn.params.frequency_penalty, turn.params.temperature) == (0.5, 0, 0.7)
    with pytest.raises(ConfigError, match="presence_penalty"):
        dataclasses.replace(model.config, presence_penalty=2.5)


def test_penalty_defaults_change_no_fingerprint() -> None:
    """How turns sample by default is not which model it is: stored memories and resumed training
    runs keep their fingerprints when a config or recipe gains default penalties."""
    config = make_model().config
    penalised = dataclasses.replace(config, presence_penalty=0.5, frequency_penalty=0.5)
    assert config_fingerprint(penalised) == config_fingerprint(config)
    assert config_fingerprint(dataclasses.replace(config, answer_tokens=12)) != config_fingerprint(config)
    recipe = load_recipe("smol3")
    unpenalised = dataclasses.replace(recipe.model, presence_penalty=0.0, frequency_penalty=0.0)
    plain = dataclasses.replace(recipe, model=unpenalised)
    assert recipe.model.presence_penalty == 0.5 and recipe.fingerprint() == plain.fingerprint()
    assert recipe.config().frequency_penalty == 0.5


def test_a_recipes_config_dict_keeps_its_penalties() -> None:
    """A ``model.config`` dict that sets penalties keeps them (the spec's own fields default to 0
    and override only when set)."""
    config = dataclasses.replace(preset("nano"), presence_penalty=0.3)
    assert ModelSpec(config=config.to_dict()).build().presence_penalty == 0.3
    assert ModelSpec(config=config.to_dict(), frequency_penalty=0.7).build().frequency_penalty == 0.7
    assert ModelSpec(preset="nano", answer_tokens=9).build().answer_tokens == 9
