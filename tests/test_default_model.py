"""The default model (``smol``, ``rxruntime/smol_model/``): SmolLM2-135M-Instruct with an RxT memory,
shipped as a compact directory that names its backbone, and it answers from its STM what a
person told it in ordinary English.

These run the shipped weights through the public runtime, the path `rxrt chat` takes (int8 on a
CPU, greedy), so a change that breaks the backbone's merge, the memory or the engine's update fails
here. The card (docs/default-model.md) has the full tables; these are small draws of them with
floors under what the weights reach.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

import rxruntime
from benchmarks.chat_penalties import FACTS
from rxruntime.models.backbone_store import Q8_SCALES
from rxruntime.models.checkpoint import DEFAULT_MODEL, SHIPPED_MODELS, default_model_dir, shipped_model_dir
from rxruntime.training.recipe import load_recipe

from .engine_util import play

SMOL = shipped_model_dir("smol")


@pytest.fixture(scope="module")
def engine() -> Iterator[rxruntime.Engine]:
    with rxruntime.load("default") as e:
        yield e


def _play(
    engine: rxruntime.Engine, queries: list[str], seed: int, reset_every_turn: bool = False, max_new_tokens: int = 24
) -> list[str]:
    """``engine_util.play`` with this model's settings: 24-token answers unless told, longer turns."""
    return play(engine, queries, seed, reset_every_turn, max_new_tokens, timeout=120)


def test_default_is_the_smollm2_model_and_small_stays_the_small_one() -> None:
    assert DEFAULT_MODEL == "smol" and default_model_dir() == SMOL
    assert SHIPPED_MODELS == {"small": "small_model", "smol": "smol_model"}


def test_the_shipped_directory_is_compact_int8_and_about_a_hundred_megabytes() -> None:
    """Only the trained parts, as q8_0 with their scales; the backbone by reference (its GGUF's
    SHA-256), fetched and cached on first load."""
    names = {p.name for p in SMOL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.loads((SMOL / "config.json").read_text())
    assert config["backbone"]["sha256"]
    assert sum(p.stat().st_size for p in SMOL.iterdir()) < 100 * 2**20
    from safetensors import safe_open

    with safe_open(SMOL / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(Q8_SCALES) for k in keys)


def test_the_shipped_model_is_what_its_recipe_trains() -> None:
    model, _ = rxruntime.models.load_pretrained("smol")
    assert model.config == load_recipe("smol3").config()


# (fact, question, the value its answer must name): one fact, asked the next turn; the probes of
# benchmarks/chat_penalties.py (the card's penalty table)
ONE_FACT = FACTS


def test_it_recalls_a_fact_from_memory_and_not_without_it(engine: rxruntime.Engine) -> None:
    """The ablation in small: the question's prompt holds only the question, so the value can come
    from the STM alone; with the STM reset before the question it must not come back (measured:
    6 of 6 with memory, 0 of 6 reset)."""
    kept = [_play(engine, [fact, question], seed=i)[-1] for i, (fact, question, _) in enumerate(ONE_FACT)]
    reset = [
        _play(engine, [fact, question], seed=i, reset_every_turn=True)[-1]
        for i, (fact, question, _) in enumerate(ONE_FACT)
    ]
    named = [value.lower() in a.lower() for a, (_, _, value) in zip(kept, ONE_FACT)]
    named_reset = [value.lower() in a.lower() for a, (_, _, value) in zip(reset, ONE_FACT)]
    assert sum(named) >= 5, kept
    assert sum(named_reset) == 0, reset


def test_it_answers_ordinary_questions_as_the_backbone_does(engine: rxruntime.Engine) -> None:
    """Only the memory was trained: a question that needs no memory is answered from what
    SmolLM2 knows, before and after a fact was written to memory. (Not every such question
    survives the fact: "What is 4 plus 4?" got 8 on the AVX-512 machines and 16 on an AVX2 one,
    whose float32 sums round differently, and after a fact "the capital of France" drew
    "Istanbul is the capital of Turkey." in 4 starts of 4 on the AVX2 machine: the card says so.)"""
    assert "Paris" in _play(engine, ["What is the capital of France?"], seed=0)[0]
    after = _play(
        engine, ["My favourite food is sushi.", "What color is the sky on a clear day?"], seed=0, max_new_tokens=48
    )[-1]
    assert "blue" in after and "sushi" not in after.lower(), after
