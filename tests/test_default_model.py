"""The model that ships inside the package: small, loadable, and it really answers from its STM.

These run the trained weights through the public runtime, the path `rxrt chat` takes, so a change
that breaks memory (the model code, the engine's update, the checkpoint) fails here.
"""

from __future__ import annotations

import pytest

import rxruntime
from rxruntime.models import RxTModel, RxTokenizer, load_pretrained, preset
from rxruntime.models.checkpoint import default_model_dir
from rxruntime.models.training.dialogues import Dialogue
from rxruntime.models.training.mrqbench import benchmark, normalise, probes

SHIPPED = default_model_dir()


@pytest.fixture(scope="module")
def shipped() -> tuple[RxTModel, RxTokenizer]:
    model, tokenizer = load_pretrained("default")
    assert tokenizer is not None
    return model, tokenizer


def test_default_model_ships_with_every_file_and_under_ten_megabytes() -> None:
    names = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 10 * 2**20


def test_default_model_is_the_nano_preset(shipped: tuple[RxTModel, RxTokenizer]) -> None:
    assert shipped[0].config == preset("nano")


def _play(engine: rxruntime.Engine, dialogue: Dialogue, fresh_memory_every_turn: bool) -> str:
    conv = engine.conversation()
    answer = ""
    for turn in dialogue.turns:
        if fresh_memory_every_turn:
            conv.close()
            conv = engine.conversation()
        answer = conv.ask(turn.query, temperature=0.0, max_new_tokens=32, timeout=60)
    conv.close()
    return answer


def test_engine_recalls_a_fact_turns_later_and_loses_it_without_memory() -> None:
    dialogues = [d for ds in probes("train", gaps=(1, 2, 3, 4), per_gap=4, seed=77).values() for d in ds]
    with rxruntime.load("default") as engine:
        kept = [_play(engine, d, fresh_memory_every_turn=False) for d in dialogues]
        fresh = [_play(engine, d, fresh_memory_every_turn=True) for d in dialogues]
    expected = [normalise(d.turns[-1].answer) for d in dialogues]
    with_memory = sum(normalise(a) == e for a, e in zip(kept, expected)) / len(dialogues)
    without = sum(normalise(a) == e for a, e in zip(fresh, expected)) / len(dialogues)
    assert with_memory >= 0.8, list(zip(kept, expected))
    assert with_memory - without >= 0.5


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_shipped_model_meets_the_retention_target(shipped: tuple[RxTModel, RxTokenizer], k: int) -> None:
    result = benchmark(*shipped, per_gap=20, gaps=[k], seed=4242, hard=False)
    with_memory, reset = result["with_memory"], result["reset_memory"]
    assert isinstance(with_memory, dict) and isinstance(reset, dict)
    assert with_memory[str(k)] - reset[str(k)] >= 0.4, result
