"""Synthetic multi-turn dialogues that can only be answered with a working memory.

A dialogue is a list of turns ``(query, answer)``. Three kinds of turn:

* **fact**: the user states something about themselves ("I live in Lisbon.") and the model
  acknowledges it, repeating the value (the acknowledgement needs no memory: the value is in the
  query).
* **question**: the user asks for a fact stated in an *earlier* turn ("Where do I live?" ->
  "You live in Lisbon."). The value is not in the query, so only the STM can supply it.
* **distractor**: a turn answerable without memory: small arithmetic, counting, letters, days,
  generic chit-chat. Distractors sit between a fact and its question, so the memory must keep the
  fact while other interactions are written into it.

Everything is a pure function of a seed, so stage ``s`` step ``i`` always sees the same batch
(which is what makes ``--resume`` exact). Each fact type has two disjoint value pools:
``train`` (used by every training split) and ``hard`` (never produced by a training generator,
not even inside distractors): the hard benchmark split asks whether the model copies values
through memory or only learned to recognise the values it was trained on.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

TurnKind = Literal["fact", "question", "distractor", "greeting", "correction", "unknown"]
"""``greeting``, ``correction`` (a fact replacing an earlier one) and ``unknown`` (a question about a
fact never stated) come from the people generator (``people.py``); this module emits the first three."""
Split = Literal["train", "hard"]
Purpose = Literal["train", "bench"]

RESERVED_BUCKETS = 10
"""One dialogue in this many (by hash) is reserved for the benchmark: training generators never
emit it and benchmark generators emit nothing else, so no benchmark dialogue is ever trained on."""


@dataclass(frozen=True)
class Turn:
    """One interaction. ``slot``/``value`` name the fact a fact or question turn is about;
    ``family`` the phrasing family its query was rendered from (people generator only); ``more``
    the further ``(slot, value)`` facts a turn states beside the first ("I'm Ada and I live in
    Lisbon.")."""

    query: str
    answer: str
    kind: TurnKind = "distractor"
    slot: str | None = None
    value: str | None = None
    family: str | None = None
    more: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Dialogue:
    turns: tuple[Turn, ...]

    def __len__(self) -> int:
        return len(self.turns)

    def reserved_for_bench(self) -> bool:
        """Whether this dialogue falls in the benchmark's hash bucket (see ``RESERVED_BUCKETS``)."""
        text = "\n".join(f"{t.query}\t{t.answer}" for t in self.turns)
        return hashlib.sha256(text.encode()).digest()[0] % RESERVED_BUCKETS == 0


@dataclass(frozen=True)
class FactType:
    """A kind of fact: how it is stated, acknowledged, asked and answered, and its value pools."""

    slot: str
    statements: tuple[str, ...]
    acknowledgements: tuple[str, ...]
    questions: tuple[str, ...]
    answer: str
    train_values: tuple[str, ...]
    hard_values: tuple[str, ...]

    def values(self, split: Split) -> tuple[str, ...]:
        return self.train_values if split == "train" else self.hard_values


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _held_out(n: int) -> bool:
    """Numbers >= 20 with ``n % 7 == 3`` belong to the hard split, for every numeric fact type."""
    return n % 7 == 3


def _numbers(low: int, high: int, hard: bool) -> tuple[str, ...]:
    return tuple(str(n) for n in range(low, high) if _held_out(n) == hard)


# Facts use numbers >= 20; distractors only ever produce numbers < 20, so a hard-split number
# never appears anywhere in training text.
_AGE_TRAIN, _AGE_HARD = _numbers(20, 90, False), _numbers(20, 90, True)
_NUMBER_TRAIN, _NUMBER_HARD = _numbers(20, 100, False), _numbers(20, 100, True)

FACT_TYPES: tuple[FactType, ...] = (
    FactType(
        "name",
        ("My name is {v}.", "Call me {v}.", "Hi, I am {v}."),
        ("Nice to meet you, {v}.", "Hello, {v}."),
        ("What is my name?", "Do you remember my name?", "Who am I?"),
        "Your name is {v}.",
        _words(
            "Alice Bob Carol David Emma Frank Grace Henry Isla Jack Kate Liam Mia Noah Olivia Peter "
            "Quinn Rose Sam Tara Victor Wendy Yara Zoe Adam Bella Chris Diana Ethan Fiona George Hannah "
            "Ivan Julia Kevin Laura Mark Nina Oscar Paula"
        ),
        ("Zeke", "Bianca", "Cyrus", "Delia", "Gideon", "Harriet", "Jasper", "Mabel", "Silas", "Thea"),
    ),
    FactType(
        "city",
        ("I live in {v}.", "My home is in {v}.", "I moved to {v}."),
        ("{v} sounds lovely.", "Oh, {v} is nice."),
        ("Where do I live?", "Which city is my home?", "Do you remember where I live?"),
        "You live in {v}.",
        _words(
            "Paris London Berlin Madrid Rome Lisbon Vienna Prague Oslo Dublin Athens Warsaw Tokyo Cairo "
            "Lima Boston Chicago Denver Sydney Toronto Seoul Delhi Nairobi Bogota Havana Munich Milan "
            "Geneva Porto Kyoto"
        ),
        ("Tallinn", "Quito", "Hanoi", "Zagreb", "Dakar", "Perth", "Bergen", "Sevilla"),
    ),
    FactType(
        "colour",
        ("My favourite colour is {v}.", "I like the colour {v} best."),
        ("{v} is a good colour.", "Noted, {v}."),
        ("What is my favourite colour?", "Which colour do I like best?"),
        "Your favourite colour is {v}.",
        ("red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white", "brown", "grey", "gold"),
        ("teal", "maroon", "amber", "violet", "indigo"),
    ),
    FactType(
        "pet",
        ("I have a pet {v}.", "At home I keep a {v}."),
        ("A {v} is a great pet.", "How nice, a {v}."),
        ("What pet do I have?", "Which animal do I keep at home?"),
        "You have a {v}.",
        ("dog", "cat", "rabbit", "parrot", "hamster", "turtle", "goldfish", "horse", "snake", "mouse", "frog"),
        ("ferret", "lizard", "pony", "gecko", "canary"),
    ),
    FactType(
        "job",
        ("I work as a {v}.", "My job is {v}.", "I am a {v} by trade."),
        ("Being a {v} must be interesting.", "A {v}, nice."),
        ("What is my job?", "What do I do for work?"),
        "You work as a {v}.",
        _words(
            "teacher doctor nurse farmer pilot baker lawyer painter driver chef writer singer dentist "
            "plumber waiter banker tailor miner cashier coder"
        ),
        ("sculptor", "surgeon", "jeweller", "librarian", "carpenter", "florist"),
    ),
    FactType(
        "food",
        ("I love eating {v}.", "My favourite food is {v}."),
        ("{v} is tasty.", "Yum, {v}."),
        ("What food do I love?", "What is my favourite food?"),
        "You love {v}.",
        _words(
            "pizza pasta sushi rice soup salad cheese bread apples bananas noodles tacos curry pancakes "
            "chocolate grapes cookies burgers"
        ),
        ("dumplings", "lasagna", "mangoes", "waffles", "risotto"),
    ),
    FactType(
        "hobby",
        ("On weekends I enjoy {v}.", "My hobby is {v}."),
        ("{v} sounds fun.", "I see, {v}."),
        ("What is my hobby?", "What do I enjoy on weekends?"),
        "Your hobby is {v}.",
        _words(
            "chess hiking fishing cooking dancing reading running swimming painting cycling gardening "
            "singing skiing knitting climbing surfing"
        ),
        ("archery", "pottery", "rowing", "juggling", "sailing"),
    ),
    FactType(
        "age",
        ("I am {v} years old.", "My age is {v}."),
        ("{v} is a fine age.", "Noted, {v} years."),
        ("How old am I?", "What is my age?"),
        "You are {v} years old.",
        _AGE_TRAIN,
        _AGE_HARD,
    ),
    FactType(
        "number",
        ("My lucky number is {v}.", "The number I like most is {v}."),
        ("{v}, good choice.", "Got it, {v}."),
        ("What is my lucky number?", "Which number do I like most?"),
        "Your lucky number is {v}.",
        _NUMBER_TRAIN,
        _NUMBER_HARD,
    ),
)

FACT_BY_SLOT = {f.slot: f for f in FACT_TYPES}

_CHITCHAT: tuple[tuple[str, str], ...] = (
    ("How are you?", "I am fine, thank you."),
    ("Hello!", "Hello! How can I help?"),
    ("Thanks a lot.", "You are welcome."),
    ("Tell me a joke.", "Why did the cat sit on the computer? To keep an eye on the mouse."),
    ("What colour is the sky?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("Is the sun hot?", "Yes, the sun is very hot."),
    ("What do bees make?", "Bees make honey."),
    ("Good morning.", "Good morning to you too."),
    ("Can you help me?", "Of course, ask me anything."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("Do fish swim?", "Yes, fish swim in water."),
    ("Say something nice.", "You are doing great today."),
    ("Is it late?", "I cannot see a clock, sorry."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def distractor(rng: random.Random) -> Turn:
    """A turn that needs no memory. Every number it produces is < 20 (see the hard split)."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        return Turn(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
    if kind == 1:
        a = rng.randrange(1, 10)
        b = rng.randrange(a + 1)
        return Turn(f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.")
    if kind == 2:
        start = rng.randrange(1, 10)
        stop = start + rng.randrange(2, 5)
        return Turn(f"Count from {start} to {stop}.", ", ".join(str(n) for n in range(start, stop + 1)) + ".")
    if kind == 3:
        i = rng.randrange(7)
        return Turn(f"What day comes after {_DAYS[i]}?", f"{_DAYS[(i + 1) % 7]} comes after {_DAYS[i]}.")
    if kind == 4:
        n = rng.randrange(10)
        return Turn(f"How do you write {n} in words?", f"{n} is written {_NUMBER_WORDS[n]}.")
    query, answer = _CHITCHAT[rng.randrange(len(_CHITCHAT))]
    return Turn(query, answer)


def fact_turn(rng: random.Random, fact: FactType, value: str) -> Turn:
    """The user states ``value``; the model acknowledges it (capitalising a leading value)."""
    ack = rng.choice(fact.acknowledgements).format(v=value)
    return Turn(rng.choice(fact.statements).format(v=value), ack[0].upper() + ack[1:], "fact", fact.slot, value)


def question_turn(rng: random.Random, fact: FactType, value: str) -> Turn:
    """The user asks for a stated fact; the one right answer is ``fact.answer`` with the value."""
    return Turn(rng.choice(fact.questions), fact.answer.format(v=value), "question", fact.slot, value)


class PlainText(ABC):
    """The plain-text views every seeded dialogue generator offers: stage 1's running text and
    stage 0's tokenizer corpus, both drawn from the generator's own interactions and dialogues."""

    rng: random.Random
    text_sentences: ClassVar[int] = 4
    """Interactions per :meth:`text` when the caller does not say."""

    @abstractmethod
    def interaction(self) -> Turn: ...

    @abstractmethod
    def dialogue(self, turns: int) -> Dialogue: ...

    def text(self, sentences: int | None = None) -> str:
        """Plain text (no template) for stage 1: a few interactions' sentences run together."""
        parts: list[str] = []
        for _ in range(self.text_sentences if sentences is None else sentences):
            turn = self.interaction()
            parts.extend((turn.query, turn.answer))
        return " ".join(parts)

    def corpus(self, n: int) -> Iterator[str]:
        """Texts for tokenizer training (stage 0): queries and answers of ``n`` dialogues."""
        for _ in range(n):
            for turn in self.dialogue(self.rng.randint(2, 8)).turns:
                yield turn.query
                yield turn.answer


@dataclass
class DialogueGenerator(PlainText):
    """Seeded source of dialogues and single interactions.

    ``split="train"`` draws fact values from the training pools, ``split="hard"`` from the
    held-out pools. ``purpose`` separates the streams twice over: it is part of the RNG seed, and
    whole dialogues are filtered by hash bucket (training never emits a benchmark dialogue).
    """

    seed: int
    split: Split = "train"
    purpose: Purpose = "train"
    max_facts: int = 3
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"rxruntime-dialogues/{self.purpose}/{self.split}/{self.seed}")

    def _accept(self, dialogue: Dialogue) -> bool:
        return dialogue.reserved_for_bench() == (self.purpose == "bench")

    def _value(self, fact: FactType) -> str:
        return self.rng.choice(fact.values(self.split))

    def dialogue(self, turns: int) -> Dialogue:
        """A dialogue of ``turns`` turns (>= 2): facts early, questions later, distractors between.

        The last turn is always a question, so every dialogue exercises recall at least once.
        """
        if turns < 2:
            raise ValueError(f"a dialogue needs at least 2 turns (a fact and its question), got {turns}")
        while True:
            dialogue = self._dialogue(turns)
            if self._accept(dialogue):
                return dialogue

    def _dialogue(self, turns: int) -> Dialogue:
        rng = self.rng
        n_facts = rng.randint(1, min(self.max_facts, turns - 1))
        facts = rng.sample(FACT_TYPES, n_facts)
        values = {f.slot: self._value(f) for f in facts}
        # Fact positions: anywhere before the last turn, which is a question about one of them.
        positions = sorted(rng.sample(range(turns - 1), n_facts))
        out: list[Turn] = []
        stated: list[FactType] = []
        pending = list(facts)
        for t in range(turns - 1):
            if t in positions:
                fact = pending.pop(0)
                stated.append(fact)
                out.append(fact_turn(rng, fact, values[fact.slot]))
            elif stated and rng.random() < 0.35:
                fact = rng.choice(stated)
                out.append(question_turn(rng, fact, values[fact.slot]))
            else:
                out.append(distractor(rng))
        fact = rng.choice(stated)
        out.append(question_turn(rng, fact, values[fact.slot]))
        return Dialogue(tuple(out))

    def probe(self, gap: int, warmup: int = 0, slot: str | None = None) -> Dialogue:
        """The benchmark's shape: ``warmup`` distractors, a fact, ``gap - 1`` distractors, its question.

        The question comes ``gap`` turns after the fact; everything in between needs no memory.
        """
        if gap < 1:
            raise ValueError(f"gap must be >= 1, got {gap}")
        while True:
            dialogue = self._probe(gap, warmup, slot)
            if self._accept(dialogue):
                return dialogue

    def _probe(self, gap: int, warmup: int, slot: str | None) -> Dialogue:
        rng = self.rng
        fact = FACT_BY_SLOT[slot] if slot is not None else rng.choice(FACT_TYPES)
        value = self._value(fact)
        turns = [distractor(rng) for _ in range(warmup)]
        turns.append(fact_turn(rng, fact, value))
        turns.extend(distractor(rng) for _ in range(gap - 1))
        turns.append(question_turn(rng, fact, value))
        return Dialogue(tuple(turns))

    def interaction(self) -> Turn:
        """One random interaction for stages 1-2: a fact, a question (with its answer) or a distractor."""
        r = self.rng.random()
        if r < 0.35:
            fact = self.rng.choice(FACT_TYPES)
            return fact_turn(self.rng, fact, self._value(fact))
        if r < 0.7:
            fact = self.rng.choice(FACT_TYPES)
            return question_turn(self.rng, fact, self._value(fact))
        return distractor(self.rng)


def dialogue_texts(dialogues: Sequence[Dialogue]) -> Iterator[str]:
    """Every query and answer of ``dialogues`` (tokenizer training on loaded data)."""
    for d in dialogues:
        for turn in d.turns:
            yield turn.query
            yield turn.answer
