"""The synthetic dialogues, the file loaders and the recipe parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rxruntime.training.data.dialogues import FACT_TYPES, Dialogue, DialogueGenerator, distractor
from rxruntime.training.data.loaders import DataError, load_hf_local, load_jsonl, parse_records
from rxruntime.training.mrqbench import probes
from rxruntime.training.recipe import RecipeError, builtin_recipes, load_recipe, recipe_from_dict


def _training_dialogues(n: int = 300) -> list[Dialogue]:
    gen = DialogueGenerator(seed=11)
    return [gen.dialogue(2 + i % 9) for i in range(n)]


def test_every_question_asks_a_fact_stated_earlier_in_the_same_dialogue() -> None:
    for d in _training_dialogues():
        assert d.turns[-1].kind == "question"
        stated: dict[str, str] = {}
        for turn in d.turns:
            if turn.kind == "fact":
                assert turn.value is not None and turn.value in turn.query  # the value is in the statement
                stated[str(turn.slot)] = turn.value
            elif turn.kind == "question":
                assert turn.slot in stated, "a question about a fact never stated"
                assert stated[str(turn.slot)] == turn.value
                assert turn.value is not None
                assert turn.value in turn.answer and turn.value not in turn.query  # only memory can supply it


def test_probe_places_the_question_exactly_k_turns_after_the_fact_with_memory_free_turns_between() -> None:
    gen = DialogueGenerator(seed=3, purpose="bench")
    for k in range(1, 9):
        for warmup in range(3):
            d = gen.probe(k, warmup=warmup)
            kinds = [t.kind for t in d.turns]
            assert kinds == ["distractor"] * warmup + ["fact"] + ["distractor"] * (k - 1) + ["question"]
            fact, question = d.turns[warmup], d.turns[-1]
            assert fact.slot == question.slot and fact.value == question.value


def test_generator_is_a_pure_function_of_its_seed() -> None:
    a = [DialogueGenerator(5).dialogue(6) for _ in range(3)]
    b = [DialogueGenerator(5).dialogue(6) for _ in range(3)]
    assert a == b
    assert DialogueGenerator(5).dialogue(6) != DialogueGenerator(6).dialogue(6)


def test_benchmark_dialogues_are_never_produced_by_training_generators() -> None:
    bench = [d for ds in probes("train", range(1, 9), 20).values() for d in ds]
    assert all(d.reserved_for_bench() for d in bench)
    train = _training_dialogues(500)
    assert not any(d.reserved_for_bench() for d in train)
    # The same probe shape drawn for training is never a benchmark dialogue either.
    train_probes = [DialogueGenerator(seed=s).probe(1) for s in range(200)]
    assert not any(d.reserved_for_bench() for d in train_probes)
    assert not set(bench) & set(train_probes)


def test_hard_split_values_never_occur_in_training_text() -> None:
    words: set[str] = set()
    gen = DialogueGenerator(seed=0)
    for _ in range(2000):
        for turn in gen.dialogue(10).turns:
            words.update(re.findall(r"\w+", f"{turn.query} {turn.answer}"))
        words.update(re.findall(r"\w+", gen.text(3)))
    hard = {v for f in FACT_TYPES for v in f.hard_values}
    assert hard, "the hard split needs values"
    assert not hard & words, f"hard values seen in training: {sorted(hard & words)}"
    for f in FACT_TYPES:
        assert not set(f.hard_values) & set(f.train_values)
    hard_probe = probes("hard", [3], 30)[3]
    assert all(d.turns[-1].value in hard for d in hard_probe)


def test_distractors_need_no_memory_and_stay_below_twenty() -> None:
    import random

    rng = random.Random(0)
    for _ in range(500):
        turn = distractor(rng)
        assert turn.kind == "distractor"
        assert all(int(n) < 20 for n in re.findall(r"\d+", turn.answer))


def test_jsonl_loader_reads_dialogues_interactions_and_text(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    records = [
        {"turns": [{"query": "I live in Oslo.", "answer": "Nice."}, {"query": "Where?", "answer": "Oslo."}]},
        {"query": "Hi", "answer": "Hello"},
        {"text": "plain text"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    corpus = load_jsonl(path)
    assert [len(d) for d in corpus.dialogues] == [2, 1]
    assert corpus.dialogues[0].turns[1].answer == "Oslo."
    assert corpus.texts == ["plain text"]


def test_jsonl_loader_names_the_bad_line_and_the_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_jsonl(path)
    with pytest.raises(DataError, match="record 0"):
        parse_records([{"prompt": "x"}])
    with pytest.raises(DataError, match="must both be strings"):
        parse_records([{"query": "x", "answer": 3}])
    with pytest.raises(DataError, match="no such JSONL"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_hf_loader_reads_local_files_or_explains_the_missing_extra(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "Hi", "a": "Hello"}) + "\n")
    from rxruntime.training.data.loaders import Fields

    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=r"rxruntime\[train\]"):
            load_hf_local(path)
        return
    corpus = load_hf_local(path, fields=Fields(query="q", answer="a"))
    assert corpus.dialogues[0].turns[0].answer == "Hello"


def test_builtin_recipes_load_and_unknown_names_list_the_known_ones() -> None:
    assert {"ci", "nano"} <= set(builtin_recipes())
    nano = load_recipe("nano")
    assert nano.model.preset == "nano"
    with pytest.raises(RecipeError, match=r"unknown recipe 'nope'.*ci.*nano"):
        load_recipe("nope")


def test_recipe_rejects_unknown_and_mistyped_fields_by_name(tmp_path: Path) -> None:
    base = json.loads(json.dumps(load_recipe("ci").to_dict()))
    bad = json.loads(json.dumps(base))
    bad["memory_aware"]["unfreez_encoder"] = 3
    with pytest.raises(RecipeError, match=r"memory_aware\.unfreez_encoder"):
        recipe_from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["joint_sft"]["steps"] = "ten"
    with pytest.raises(RecipeError, match=r"joint_sft\.steps must be int"):
        recipe_from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["tokenizer"]["vocab_size"] = 200
    with pytest.raises(RecipeError, match="263"):
        recipe_from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["model"]["config"]["dimm"] = 3
    with pytest.raises(RecipeError, match="dimm"):
        recipe_from_dict(bad)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(base))
    assert load_recipe(path) == recipe_from_dict(base)
