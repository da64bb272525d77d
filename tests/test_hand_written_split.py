"""The hand-written split of ``rxrt eval memory`` (``training/data/hand_written.json``): what it
covers, how its probes are built, and that training never saw it."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from rxruntime.cli import main
from rxruntime.training.data.dialogues import DialogueGenerator, Turn
from rxruntime.training.data.hand_written import CATEGORIES, hand_written_probes, load_hand_written
from rxruntime.training.data.loaders import DataError
from rxruntime.training.data.people import PeopleGenerator
from rxruntime.training.mrqbench import normalise
from rxruntime.training.people_eval import EVAL_SPLITS, HAND_WRITTEN, split_probes

pytest.importorskip("faker")

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> list[str]:
    return [normalise(s) for s in _SENTENCE.split(text) if s.strip()]


def test_the_split_covers_every_way_of_stating_a_fact() -> None:
    data = load_hand_written()
    assert len(data.items) >= 40
    per_category = Counter(i.category for i in data.items)
    assert set(per_category) == set(CATEGORIES) and min(per_category.values()) >= 5
    assert len({normalise(i.question) for i in data.items}) == len(data.items)  # every question its own words
    assert any(len(i.turns) > 1 for i in data.items if i.category == "correction")
    for item in data.items:
        if item.value is None:
            assert item.answer.startswith("I don't know")
        else:
            assert item.value in item.answer and item.value.lower() in item.turns[-1].lower()


def test_no_sentence_or_value_question_pair_is_in_the_training_data() -> None:
    """A large sample of what the training generators render (people dialogues of 2-10 turns and
    single interactions over several seeds, and the template generator's dialogues) shares no
    message, no sentence of four words or more, and no (value, question) pair with the split."""
    said: set[str] = set()
    sentences: set[str] = set()
    pairs: set[tuple[str, str]] = set()

    def add(turn: Turn) -> None:
        for text in (turn.query, turn.answer):
            said.add(normalise(text))
            sentences.update(_sentences(text))
        if turn.kind == "question" and turn.value is not None:
            pairs.add((normalise(turn.value), normalise(turn.query)))

    rng = random.Random(0)
    for seed in range(4):
        people = PeopleGenerator(seed)
        for _ in range(5000):
            for turn in people.dialogue(rng.randint(2, 10)).turns:
                add(turn)
            add(people.interaction())
        templates = DialogueGenerator(seed)
        for _ in range(1000):
            for turn in templates.dialogue(rng.randint(2, 8)).turns:
                add(turn)
    assert len(said) > 30_000  # the sample is large, not a few fixed strings,
    assert normalise("Do you remember my name?") in said  # and it holds the training templates

    data = load_hand_written()
    for text in data.sentences():
        assert normalise(text) not in said, text
        for sentence in _sentences(text):
            assert len(sentence.split()) < 4 or sentence not in sentences, (text, sentence)
    for item in data.items:
        if item.value is not None:
            assert (normalise(item.value), normalise(item.question)) not in pairs, item.id


def test_the_question_comes_k_turns_after_the_items_last_turn() -> None:
    data = load_hand_written()
    probes = split_probes(HAND_WRITTEN, range(1, 9), 50, seed=5)
    for k, dialogues in probes.items():
        assert len(dialogues) == len(data.items)
        for item, d in zip(data.items, dialogues):
            assert len(d) == len(item.turns) + k
            assert [t.query for t in d.turns[: len(item.turns)]] == list(item.turns)
            assert all(t.query in data.small_talk for t in d.turns[len(item.turns) : -1])
            assert d.turns[-1].query == item.question and d.turns[-1].answer == item.answer
    assert hand_written_probes([3], 50, seed=5) == {3: probes[3]}  # a pure function of the seed
    assert len(hand_written_probes([2], 4, seed=5)[2]) == 4  # --dialogues caps the items per gap


def test_a_damaged_file_is_a_data_error(tmp_path: Path) -> None:
    good = json.loads((Path(load_hand_written.__code__.co_filename).parent / "hand_written.json").read_text())
    bad = {**good, "items": [{**good["items"][0], "value": "Nobody"}]}  # a value the turn never says
    (tmp_path / "x.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="last turn"):
        load_hand_written(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({**good, "items": [{**good["items"][0], "slot": "shoe"}]}))
    with pytest.raises(DataError, match="shoe"):
        load_hand_written(tmp_path / "y.json")


def test_eval_memory_has_a_hand_written_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert HAND_WRITTEN in EVAL_SPLITS
    args = ["eval", "memory", "--model", "small", "--splits", HAND_WRITTEN, "--dialogues", "3", "--max-gap", "2"]
    assert main([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["splits"][HAND_WRITTEN]
    assert record["dialogues"] == 6
    for key in ("with_memory", "reset_memory"):
        assert list(record[key]) == ["1", "2"] and list(record["value_in_answer"][key]) == ["1", "2"]
        for k in ("1", "2"):  # an exact answer always contains the value
            assert record["value_in_answer"][key][k] >= record[key][k]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "hand_written" in out and "value in answer" in out
