"""A tiny template grammar: ``[a|b|c]`` picks one alternative, ``{v}`` and friends take a value.

Phrasings are written once with their variation spelled inline ("[I'm|I am] {v}."), and every
rendering draws the choices from the caller's ``random.Random``, so a dialogue stays a pure
function of its seed. Alternatives may be empty ("[|Hi! ]") and may nest ("[a [b|c]|d]").

Placeholders: ``{v}`` the value as given, ``{a}`` the value with "a"/"an" before it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_VOWELS = frozenset("aeiouAEIOU")


class GrammarError(ValueError):
    """A template has unbalanced brackets."""


def article(value: str) -> str:
    """``value`` with the English indefinite article that sounds right before it."""
    return f"an {value}" if value[:1] in _VOWELS else f"a {value}"


def expand(template: str, rng: random.Random) -> str:
    """Resolve every ``[a|b]`` choice of ``template`` (placeholders are left for ``render``)."""
    out, i = _expand(template, 0, rng, top=True)
    if i != len(template):
        raise GrammarError(f"unbalanced ']' in {template!r}")
    return out


def _expand(text: str, i: int, rng: random.Random, top: bool) -> tuple[str, int]:
    """Expand from ``i`` up to the end (top level) or the ``]`` closing this group."""
    options: list[str] = []
    current: list[str] = []
    while i < len(text):
        c = text[i]
        if c == "[":
            inner, i = _expand(text, i + 1, rng, top=False)
            current.append(inner)
            continue
        if c == "]":
            if top:
                raise GrammarError(f"unbalanced ']' in {text!r}")
            options.append("".join(current))
            return rng.choice(options), i + 1
        if c == "|" and not top:
            options.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    if not top:
        raise GrammarError(f"unclosed '[' in {text!r}")
    return "".join(current), i


def render(template: str, rng: random.Random, value: str = "") -> str:
    """Expand the choices of ``template``, then fill its placeholders with ``value``."""
    text = expand(template, rng)
    return text.replace("{a}", article(value)).replace("{v}", value)


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def lower_first(text: str) -> str:
    """Lower-case the first letter, unless the text starts with the pronoun "I" (I, I'm, I've...)."""
    if text[:1] == "I" and (len(text) == 1 or not text[1].isalpha()):
        return text
    return text[:1].lower() + text[1:]


@dataclass(frozen=True)
class Family:
    """A named group of templates that say the same thing the same way.

    Families, not single templates, are what evaluation holds out: a held-out family's wording
    (not only its exact sentences) never occurs in training.
    """

    name: str
    templates: tuple[str, ...]
    held_out: bool = False

    def render(self, rng: random.Random, value: str = "") -> str:
        return render(rng.choice(self.templates), rng, value)
