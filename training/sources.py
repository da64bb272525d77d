"""What each curriculum stage reads, from the synthetic generator or from a loaded corpus.

A source answers four questions, always through a step's own ``random.Random`` so that the data
of step ``i`` is a pure function of the seed (exact resume):

* ``tokenizer_texts()``: the corpus for stage 0,
* ``texts(rng, n)``: plain text for stage 1,
* ``interactions(rng, n)``: single ``(query, answer)`` turns for stage 2,
* ``dialogues(rng, n, turns)``: multi-turn dialogues for stages 3 and 4.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Protocol

from .data.dialogues import Dialogue, DialogueGenerator, Turn, dialogue_texts
from .data.loaders import Corpus, DataError, Fields, load_hf_local, load_jsonl
from .data.people import PeopleGenerator
from .recipe import DataSpec


class Source(Protocol):
    def tokenizer_texts(self) -> Iterator[str]: ...
    def texts(self, rng: random.Random, n: int) -> list[str]: ...
    def interactions(self, rng: random.Random, n: int) -> list[Turn]: ...
    def dialogues(self, rng: random.Random, n: int, turns: int) -> list[Dialogue]: ...


class SyntheticSource:
    """The built-in generator: every call draws a fresh generator seed from the step's RNG."""

    def __init__(self, seed: int, tokenizer_dialogues: int, sentences: int = 3) -> None:
        self.seed = seed
        self.tokenizer_dialogues = tokenizer_dialogues
        self.sentences = sentences

    def _gen(self, rng: random.Random) -> DialogueGenerator:
        return DialogueGenerator(rng.getrandbits(62))

    def tokenizer_texts(self) -> Iterator[str]:
        return DialogueGenerator(self.seed).corpus(self.tokenizer_dialogues)

    def texts(self, rng: random.Random, n: int) -> list[str]:
        gen = self._gen(rng)
        return [gen.text(self.sentences) for _ in range(n)]

    def interactions(self, rng: random.Random, n: int) -> list[Turn]:
        gen = self._gen(rng)
        return [gen.interaction() for _ in range(n)]

    def dialogues(self, rng: random.Random, n: int, turns: int) -> list[Dialogue]:
        gen = self._gen(rng)
        return [gen.dialogue(turns) for _ in range(n)]


class PeopleSource(SyntheticSource):
    """The people generator (``people.py``): endless values, varied phrasings, corrections."""

    def __init__(
        self,
        seed: int,
        tokenizer_dialogues: int,
        sentences: int = 3,
        compound: float = 0.0,
        general: float = 0.0,
        recall_last: float = 0.85,
    ) -> None:
        super().__init__(seed, tokenizer_dialogues, sentences)
        self.compound, self.general, self.recall_last = compound, general, recall_last

    def _gen(self, rng: random.Random) -> PeopleGenerator:  # type: ignore[override]
        return PeopleGenerator(
            rng.getrandbits(62), compound=self.compound, general=self.general, recall_last=self.recall_last
        )

    def tokenizer_texts(self) -> Iterator[str]:
        return PeopleGenerator(self.seed).corpus(self.tokenizer_dialogues)


class CorpusSource:
    """Loaded records, sampled with replacement. ``turns`` is ignored: dialogues keep their length."""

    def __init__(self, corpus: Corpus, origin: str) -> None:
        if not corpus.dialogues and not corpus.texts:
            raise DataError(f"{origin}: no records")
        self.corpus = corpus
        self.turns = [t for d in corpus.dialogues for t in d.turns]
        self.multi = [d for d in corpus.dialogues if len(d) >= 2]
        self.plain = corpus.texts or [f"{t.query} {t.answer}" for t in self.turns]
        self.origin = origin

    def tokenizer_texts(self) -> Iterator[str]:
        yield from self.corpus.texts
        yield from dialogue_texts(self.corpus.dialogues)

    def texts(self, rng: random.Random, n: int) -> list[str]:
        return rng.choices(self.plain, k=n)

    def interactions(self, rng: random.Random, n: int) -> list[Turn]:
        if not self.turns:
            raise DataError(f"{self.origin}: stage 2 needs (query, answer) records, found only plain text")
        return rng.choices(self.turns, k=n)

    def dialogues(self, rng: random.Random, n: int, turns: int) -> list[Dialogue]:
        if not self.multi:
            raise DataError(f"{self.origin}: stages 3-4 need dialogues of >= 2 turns, found none")
        return rng.choices(self.multi, k=n)


def make_source(spec: DataSpec, seed: int, tokenizer_dialogues: int, sentences: int = 3) -> Source:
    """The source a recipe's ``data`` section names."""
    if spec.source == "synthetic":
        return SyntheticSource(seed, tokenizer_dialogues, sentences)
    if spec.source == "people":
        return PeopleSource(
            seed, tokenizer_dialogues, sentences, spec.compound_facts, spec.general_questions, spec.recall_last
        )
    fields = Fields(spec.turns_field, spec.query_field, spec.answer_field, spec.text_field)
    assert spec.path is not None  # Recipe.validate() guarantees it
    if spec.source == "jsonl":
        return CorpusSource(load_jsonl(spec.path, fields), spec.path)
    return CorpusSource(load_hf_local(spec.path, spec.split, fields), spec.path)
