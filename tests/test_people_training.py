"""The curriculum on the people generator (``data.source = "people"``), with the tiny ``ci`` model."""

from __future__ import annotations

import json
from pathlib import Path

from rxruntime.models import load_pretrained
from rxruntime.training.recipe import load_recipe, recipe_from_dict
from rxruntime.training.sources import PeopleSource, make_source
from rxruntime.training.trainer import Trainer


def test_ci_recipe_trains_every_stage_on_people_dialogues(tmp_path: Path) -> None:
    spec = load_recipe("ci").to_dict()
    spec["data"]["source"] = "people"
    recipe = recipe_from_dict(spec)
    assert isinstance(make_source(recipe.data, 1, 10), PeopleSource)
    assert Trainer(recipe, tmp_path).run()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["memory_aware"]["steps"] == recipe.memory_aware.steps
    assert summary["stages"]["joint_pretrain"]["last"]["loss"] < summary["stages"]["joint_pretrain"]["first"]["loss"]
    _, tokenizer = load_pretrained(tmp_path / "model")
    assert tokenizer is not None
    for value in ("Łukasz Zięcik", "İÇDAŞ Çelik Enerji", "the 12th of December", "54.94"):  # held-out locales too
        assert tokenizer.decode(tokenizer.encode(f"My name is {value}.")).strip() == f"My name is {value}."
