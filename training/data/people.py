"""Dialogues the way people talk: endless values, varied wording, several facts, corrections.

A training dialogue greets, states 1-4 facts about the user in varied words (``phrasings.py``)
with values drawn fresh every time (``values.py``), mixes in small talk (``chitchat.py``), may
correct a fact ("Actually, I live in Porto now."), asks about stated facts (answered from memory)
and about facts never stated (answered "I don't know your ..."). The last turn is always a
question, so every dialogue exercises recall or its honest absence.

``probe`` builds the evaluation shapes: the question comes exactly ``k`` turns after the fact it
asks about (or its correction), with other facts and small talk in between. Everything is a pure
function of the seed; ``purpose`` is part of it, so training and evaluation never share a stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .chitchat import chitchat, general_question, greeting
from .dialogues import Dialogue, PlainText, Purpose, Turn
from .grammar import Family, capitalise, lower_first, render
from .phrasings import (
    CORRECTION_ACKS,
    CORRECTION_FRAMES,
    GREETING_ACK_PREFIXES,
    PHRASINGS,
    QUESTION_FRAMES,
    STATEMENT_FRAMES,
    PhraseSplit,
    families_for,
    frame,
)
from .values import SLOTS, ValueSplit, draw_value

ProbeKind = Literal["recall", "correction", "never_stated"]


def _sentence(text: str, value: str) -> str:
    """Capitalise ``text`` unless it starts with ``value``, which is repeated exactly as said."""
    return text if text.startswith(value) else capitalise(text)


@dataclass
class PeopleGenerator(PlainText):
    """Seeded source of people-like dialogues.

    ``values`` picks the value split (``train`` or ``unseen``), ``phrasings`` the phrasing split
    (``train`` or ``held_out``: held-out statement, question and frame families only).
    """

    seed: int
    values: ValueSplit = "train"
    phrasings: PhraseSplit = "train"
    purpose: Purpose = "train"
    max_facts: int = 4
    compound: float = 0.0
    """Share of fact turns (where two facts are still to be stated) that state two facts in one
    sentence ("I'm Ada and I live in Lisbon."). 0 draws nothing for it, so a generator made
    before this option gives the same dialogues."""
    general: float = 0.0
    """Share of a training dialogue's memory-free turns that are questions to the assistant about
    the world or itself (``chitchat.GENERAL_QUESTIONS``) instead of small talk. 0 draws nothing for
    it (the same dialogues as before the option); evaluation probes never use it."""
    recall_last: float = 0.85
    """Share of training dialogues whose last question asks about a stated fact (the others ask
    about one never stated: "I don't know your ...")."""
    rng: random.Random = field(init=False, repr=False)
    text_sentences: ClassVar[int] = 3

    def __post_init__(self) -> None:
        self.rng = random.Random(f"rxruntime-people/{self.purpose}/{self.values}/{self.phrasings}/{self.seed}")

    # ------------------------------------------------------------------ single turns
    def value(self, slot: str) -> str:
        return draw_value(slot, self.values, self.rng)

    def _family(self, families: tuple[Family, ...]) -> Family:
        return self.rng.choice(families_for(families, self.phrasings))

    def fact(self, slot: str, value: str) -> Turn:
        """The user states ``value``; the model acknowledges it, repeating the value."""
        rng = self.rng
        family = self._family(PHRASINGS[slot].statements)
        body = family.render(rng, value)
        frame_family = self._family(STATEMENT_FRAMES)
        query = frame(frame_family, rng, body, keep_case=body.startswith(value))
        return Turn(query, self._greeted(frame_family, self._ack(slot, value)), "fact", slot, value, family.name)

    def facts(self, slots: tuple[str, str], values: tuple[str, str]) -> Turn:
        """Two facts in one sentence, joined by "and"; the acknowledgement repeats both values.
        ``slot``/``value`` of the turn name the first; memory has to hold both."""
        rng = self.rng
        bodies = [self._family(PHRASINGS[s].statements).render(rng, v) for s, v in zip(slots, values)]
        first, second = bodies[0].rstrip("."), bodies[1]
        second = second if second.startswith(values[1]) else lower_first(second)
        body = f"{first} and {second}"
        frame_family = self._family(STATEMENT_FRAMES)
        query = frame(frame_family, rng, body, keep_case=body.startswith(values[0]))
        ack = self._greeted(frame_family, " ".join(self._ack(s, v) for s, v in zip(slots, values)))
        return Turn(query, ack, "fact", slots[0], values[0], "compound", ((slots[1], values[1]),))

    def _ack(self, slot: str, value: str) -> str:
        """The slot's acknowledgement of a stated fact, repeating ``value`` as said."""
        return _sentence(render(self.rng.choice(PHRASINGS[slot].acknowledgements), self.rng, value), value)

    def _greeted(self, frame_family: Family, ack: str) -> str:
        """A greeting statement gets a greeting back, unless the acknowledgement already is one."""
        if frame_family.name == "frame.greeting" and not ack.startswith(("Hello", "Hi")):
            return self.rng.choice(GREETING_ACK_PREFIXES) + ack
        return ack

    def correction(self, slot: str, value: str) -> Turn:
        """The user replaces an earlier fact; from now on ``value`` is the right answer."""
        rng, p = self.rng, PHRASINGS[slot]
        family = self._family(p.statements)
        body = family.render(rng, value)
        query = frame(Family("correction", CORRECTION_FRAMES), rng, body, keep_case=body.startswith(value))
        ack = _sentence(render(rng.choice(CORRECTION_ACKS), rng, value), value)
        return Turn(query, ack, "correction", slot, value, family.name)

    def question(self, slot: str, value: str) -> Turn:
        """A question about a stated fact; its one right answer is the slot's answer with ``value``."""
        rng, p = self.rng, PHRASINGS[slot]
        family = self._family(p.questions)
        query = frame(self._family(QUESTION_FRAMES), rng, family.render(rng))
        return Turn(query, render(p.answer, rng, value), "question", slot, value, family.name)

    def unknown(self, slot: str) -> Turn:
        """A question about a fact never stated: the answer says so."""
        rng, p = self.rng, PHRASINGS[slot]
        family = self._family(p.questions)
        query = frame(self._family(QUESTION_FRAMES), rng, family.render(rng))
        return Turn(query, p.unknown, "unknown", slot, None, family.name)

    def _new_value(self, slot: str, old: str) -> str:
        value = self.value(slot)
        while value.lower() == old.lower():
            value = self.value(slot)
        return value

    # ------------------------------------------------------------------ training dialogues
    def dialogue(self, turns: int) -> Dialogue:
        """A training dialogue of ``turns`` turns (>= 2) ending with a question."""
        if turns < 2:
            raise ValueError(f"a dialogue needs at least 2 turns (a fact and its question), got {turns}")
        rng = self.rng
        # with compound statements a dialogue may hold one fact more than it has turns before the question
        n_facts = rng.randint(1, min(self.max_facts, turns - 1 + (1 if self.compound else 0)))
        slots = rng.sample(SLOTS, n_facts)
        positions = set(rng.sample(range(turns - 1), min(n_facts, turns - 1)))
        pending = list(slots)
        known: dict[str, str] = {}
        out: list[Turn] = []
        for t in range(turns - 1):
            r = rng.random()
            if t in positions and pending:  # (a position finds none left once two facts shared a turn)
                left = sum(1 for p in positions if p >= t)  # this one included
                if self.compound and len(pending) >= 2 and (len(pending) > left or rng.random() < self.compound):
                    pair = (pending.pop(0), pending.pop(0))
                    for slot in pair:
                        known[slot] = self.value(slot)
                    out.append(self.facts(pair, (known[pair[0]], known[pair[1]])))
                else:
                    slot = pending.pop(0)
                    known[slot] = self.value(slot)
                    out.append(self.fact(slot, known[slot]))
            elif t == 0 and r < 0.3:
                out.append(greeting(rng))
            elif known and r < 0.3:
                slot = rng.choice(sorted(known))
                out.append(self.question(slot, known[slot]))
            elif known and r < 0.4:
                slot = rng.choice(sorted(known))
                known[slot] = self._new_value(slot, known[slot])
                out.append(self.correction(slot, known[slot]))
            elif 0.4 <= r < 0.48:
                out.append(self.unknown(rng.choice([s for s in SLOTS if s not in known])))
            elif self.general and rng.random() < self.general:
                out.append(general_question(rng))
            else:
                out.append(chitchat(rng))
        if rng.random() < self.recall_last:
            slot = rng.choice(sorted(known))
            out.append(self.question(slot, known[slot]))
        else:
            out.append(self.unknown(rng.choice([s for s in SLOTS if s not in known])))
        return Dialogue(tuple(out))

    def interaction(self) -> Turn:
        """One interaction for stages 1-2 (a question's value is drawn, not remembered)."""
        rng = self.rng
        r = rng.random()
        slot = rng.choice(SLOTS)
        if r < 0.3:
            return self.fact(slot, self.value(slot))
        if r < 0.55:
            return self.question(slot, self.value(slot))
        if r < 0.62:
            return self.correction(slot, self.value(slot))
        if r < 0.7:
            return self.unknown(slot)
        return chitchat(rng)

    # ------------------------------------------------------------------ evaluation shapes
    def probe(self, k: int, facts: int = 1, kind: ProbeKind = "recall") -> Dialogue:
        """A dialogue whose last turn asks about a fact stated (or corrected) exactly ``k`` turns earlier.

        ``facts`` facts are in play (the asked one included); the others and small talk fill the
        remaining turns, placed at random, some before the asked fact (0-2 warm-up turns) and some
        between it and the question. ``correction``: the asked fact was stated once with another
        value before it was corrected ``k`` turns before the question. ``never_stated``: ``facts``
        facts are stated, the last ``k`` turns before the question, and the question asks a slot
        none of them is about; the answer is the slot's "I don't know".
        """
        if k < 1 or facts < 1:
            raise ValueError(f"need k >= 1 and facts >= 1, got k={k}, facts={facts}")
        rng = self.rng
        n_slots = facts + (kind == "never_stated")
        slots = rng.sample(SLOTS, n_slots)
        asked = slots[0]
        stated = slots[1:] if kind == "never_stated" else slots
        before = rng.randint(0, 2)
        # Turns that must come before the question: the stated facts (plus the first statement of
        # a corrected fact). The anchor (asked fact, its correction, or the last stated fact when
        # never_stated) sits at ``before``; the question k turns later.
        others = stated[1:] if kind != "never_stated" else stated[:-1]
        if kind == "never_stated":
            before = max(before, len(others))  # every stated fact at or before the anchor
        else:
            before = max(before, len(others) + (kind == "correction") + 1 - k, kind == "correction")
        length = before + k
        anchor = before
        free = [i for i in range(length) if i != anchor]
        first = -1
        if kind == "correction":
            first = rng.randrange(anchor)
            free.remove(first)
        if kind == "never_stated":
            free = [i for i in free if i < anchor]
        spots = rng.sample(free, len(others))
        out: list[Turn | None] = [None] * length
        values: dict[str, str] = {}
        if kind == "correction":
            old = self.value(asked)
            out[first] = self.fact(asked, old)
            values[asked] = self._new_value(asked, old)
            out[anchor] = self.correction(asked, values[asked])
        elif kind == "never_stated":
            last = stated[-1]
            out[anchor] = self.fact(last, self.value(last))
        else:
            values[asked] = self.value(asked)
            out[anchor] = self.fact(asked, values[asked])
        for slot, spot in zip(others, spots):
            out[spot] = self.fact(slot, self.value(slot))
        turns = [t if t is not None else chitchat(rng) for t in out]
        question = self.unknown(asked) if kind == "never_stated" else self.question(asked, values[asked])
        return Dialogue((*turns, question))
