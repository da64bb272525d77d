"""Fact values drawn without end: Faker in many locales, numbers of any size, dates, invented words.

A model that only ever sees a few dozen names learns to recognise them, not to carry what it was
told (docs/small-model.md). Here every value is drawn fresh, so memorising values cannot pay.

Evaluation keeps three things out of training:

* **a partition of all values** (``held_out_value``): a value string whose SHA-256 starts with a
  byte that is ``0 mod HELD_OUT_BUCKETS``, or one from a held-out hand-written pool, is never a
  training value, whatever slot or family drew it;
* **held-out locales** (``HELD_OUT_LOCALES``): names, cities, jobs... in languages training never draws;
* **held-out families**: whole kinds of value (invented names, decimals, exotic pets...).

The ``unseen`` split draws only from held-out locales or families *and* only values in the held-out
partition, so an unseen value is never a training value. Faker's output depends on its version
(pinned in the ``train`` extra); one draw is one ``seed_instance`` from the caller's RNG, so a
value is a pure function of that RNG.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .loaders import DataError

ValueSplit = Literal["train", "unseen"]

HELD_OUT_BUCKETS = 8
"""One value string in this many (by hash) is kept for evaluation."""

TRAIN_LOCALES: tuple[tuple[str, int], ...] = (
    ("en_US", 6),
    ("en_GB", 3),
    ("en_IN", 1),
    ("de_DE", 1),
    ("fr_FR", 1),
    ("es_ES", 1),
    ("it_IT", 1),
    ("nl_NL", 1),
    ("pt_BR", 1),
    ("sv_SE", 1),
)
"""Locales training draws from, with weights (English first: the model talks English)."""

HELD_OUT_LOCALES: tuple[str, ...] = ("pl_PL", "tr_TR", "fi_FI", "cs_CZ")
"""Locales only the ``unseen`` split draws from."""

MAX_CHARS = 28
MAX_WORDS = 4
_BAD = re.compile(r"[,()/&\"\[\]{}|;:!?]")


def held_out_value(value: str) -> bool:
    """Whether ``value`` is kept for evaluation: in the hash partition (slot-independent,
    case-insensitive) or in one of the held-out hand-written pools (``RESERVED``)."""
    key = " ".join(value.lower().split())
    return key in RESERVED or hashlib.sha256(key.encode()).digest()[0] % HELD_OUT_BUCKETS == 0


def usable(value: str) -> bool:
    """Short, single-line, no punctuation that would break a sentence around it."""
    return 0 < len(value) <= MAX_CHARS and len(value.split()) <= MAX_WORDS and not _BAD.search(value)


@functools.cache
def _faker(locale: str) -> Any:
    """One Faker per locale, its element lists in a fixed order.

    Faker's it_IT address provider builds its city list from a set, so the list's order, and the
    city a seeded draw picks, followed the process's string-hash seed (``PYTHONHASHSEED``); a
    training run was not a function of its recipe. Sorting that list fixes it.
    ``tests/test_people_data.py`` replays the generator under two hash seeds to catch any other.
    """
    try:
        from faker import Faker  # imported lazily: only training and evaluation need it
    except ImportError:
        raise DataError(
            'the people generator (data.source = "people", `rxrt eval memory`) draws its values '
            "from Faker: pip install 'rxruntime[train]'"
        ) from None

    fake = Faker(locale)
    for provider in fake.providers:
        cities = getattr(provider, "cities", None)
        if isinstance(cities, list):
            provider.cities = sorted(cities)
    return fake


def faker_draw(method: str, rng: random.Random, locale: str) -> str:
    fake = _faker(locale)
    fake.seed_instance(rng.getrandbits(48))
    return str(getattr(fake, method)()).strip()


def _english(locale: str) -> bool:
    return locale.startswith("en")


# ---------------------------------------------------------------------------- value makers
_CONSONANTS = "bdfgklmnprstvz"
_CLUSTERS = ("br", "dr", "fl", "gr", "kl", "pr", "st", "tr", "sk", "pl")
_VOWEL_SOUNDS = ("a", "e", "i", "o", "u", "ai", "ou", "ee")
_CODAS = ("", "", "", "n", "r", "x", "s", "l", "m")


def invented_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable word that is in no dictionary ("blorvex", "tamisu")."""
    parts = []
    for i in range(syllables):
        onset = rng.choice(_CLUSTERS) if rng.random() < 0.25 else rng.choice(_CONSONANTS)
        coda = rng.choice(_CODAS) if i == syllables - 1 else ""
        parts.append(onset + rng.choice(_VOWEL_SOUNDS) + coda)
    return "".join(parts)


def number(rng: random.Random, max_digits: int = 7) -> str:
    """A whole number of 1..``max_digits`` digits, each length equally likely (so large ones are common)."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return str(rng.randrange(low, 10**digits))


_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_DAYS_IN = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _day_month(rng: random.Random) -> tuple[int, str]:
    m = rng.randrange(12)
    return rng.randint(1, _DAYS_IN[m]), _MONTHS[m]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _ordinal_day(rng: random.Random) -> tuple[str, str]:
    day, month = _day_month(rng)
    return _ordinal(day), month


_ANIMALS = (
    "dog",
    "cat",
    "rabbit",
    "parrot",
    "hamster",
    "turtle",
    "goldfish",
    "horse",
    "snake",
    "mouse",
    "frog",
    "guinea",
    "pig",
    "budgie",
    "canary",
    "tortoise",
    "chinchilla",
    "rat",
    "goat",
    "pig",
    "duck",
    "chicken",
    "pony",
    "donkey",
    "cockatiel",
    "lizard",
    "gecko",
    "ferret",
    "hedgehog",
    "iguana",
    "cow",
    "sheep",
    "crab",
    "tarantula",
    "beagle",
    "poodle",
    "labrador",
    "kitten",
    "puppy",
)
_ANIMALS_TWO = ("guinea pig", "bearded dragon", "corn snake", "border collie", "siamese cat", "tree frog")
_EXOTIC_PETS = (
    "axolotl",
    "capybara",
    "sugar glider",
    "fennec fox",
    "alpaca",
    "hermit crab",
    "stick insect",
    "salamander",
    "tree kangaroo",
    "pangolin",
    "mongoose",
    "kinkajou",
)
_FOODS = (
    "pizza",
    "pasta",
    "sushi",
    "rice",
    "soup",
    "salad",
    "cheese",
    "bread",
    "apples",
    "bananas",
    "noodles",
    "tacos",
    "curry",
    "pancakes",
    "chocolate",
    "grapes",
    "cookies",
    "burgers",
    "steak",
    "falafel",
    "hummus",
    "omelettes",
    "strawberries",
    "oranges",
    "popcorn",
    "chips",
    "ice",
    "cream",
    "lasagne",
    "ramen",
    "burritos",
    "kebab",
    "paella",
    "pie",
    "cake",
    "porridge",
    "yoghurt",
    "dumplings",
    "peaches",
    "cherries",
    "avocado",
    "sandwiches",
    "fried",
    "rice",
    "fish",
    "and",
    "chips",
    "spaghetti",
    "meatballs",
    "pretzels",
    "bagels",
    "muffins",
    "waffles",
)
_FOOD_DISHES = (
    "fried rice",
    "fish and chips",
    "ice cream",
    "apple pie",
    "chicken curry",
    "tomato soup",
    "roast chicken",
    "mac and cheese",
    "chili con carne",
    "pad thai",
    "shepherd's pie",
    "carrot cake",
)
_FOOD_ADJECTIVES = ("spicy", "fresh", "homemade", "grilled", "sweet", "warm", "crispy", "vegan", "baked", "fried")
_WORLD_DISHES = (
    "pierogi",
    "baklava",
    "borscht",
    "injera",
    "bibimbap",
    "feijoada",
    "goulash",
    "moussaka",
    "poutine",
    "ceviche",
    "jollof rice",
    "pho",
    "khachapuri",
    "laksa",
)
_HOBBIES = (
    "chess",
    "hiking",
    "fishing",
    "cooking",
    "dancing",
    "reading",
    "running",
    "swimming",
    "painting",
    "cycling",
    "gardening",
    "singing",
    "skiing",
    "knitting",
    "climbing",
    "surfing",
    "photography",
    "drawing",
    "baking",
    "yoga",
    "boxing",
    "tennis",
    "football",
    "basketball",
    "golf",
    "camping",
    "sewing",
    "writing",
    "gaming",
    "skating",
    "birdwatching",
    "woodworking",
    "karate",
    "volleyball",
    "meditation",
)
_HOBBIES_TWO = (
    "playing guitar",
    "playing the piano",
    "board games",
    "bird watching",
    "rock climbing",
    "video games",
    "learning languages",
    "watching films",
    "collecting stamps",
    "building models",
)
_RARE_HOBBIES = (
    "archery",
    "pottery",
    "rowing",
    "juggling",
    "sailing",
    "fencing",
    "falconry",
    "calligraphy",
    "origami",
    "beekeeping",
    "kayaking",
    "geocaching",
    "lockpicking",
)
_BASIC_COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "pink",
    "black",
    "white",
    "brown",
    "grey",
    "gold",
    "silver",
    "navy",
    "beige",
    "turquoise",
)


def _colour(rng: random.Random, locale: str) -> str:
    raw = faker_draw("color_name", rng, locale)
    # Faker's English colours are CamelCase ("DarkSlateGray"): split into words.
    return " ".join(re.findall(r"[A-Z]?[a-zà-ÿ]+|[A-Z]+(?![a-z])", raw)).lower() if raw.isalnum() else raw.lower()


def _job(rng: random.Random, locale: str) -> str:
    job = faker_draw("job", rng, locale)
    return job.lower() if _english(locale) else job


def _full_name(rng: random.Random, locale: str) -> str:
    return f"{faker_draw('first_name', rng, locale)} {faker_draw('last_name', rng, locale)}"


Draw = Callable[[random.Random, str], str]


@dataclass(frozen=True)
class ValueFamily:
    """One way of drawing values for a slot. ``localised`` families draw in a Faker locale."""

    name: str
    draw: Draw
    localised: bool = False
    held_out: bool = False


def _pick(pool: tuple[str, ...]) -> Draw:
    return lambda rng, _locale: rng.choice(pool)


def _faker_family(name: str, method: str) -> ValueFamily:
    return ValueFamily(name, lambda rng, locale: faker_draw(method, rng, locale), localised=True)


FAMILIES: dict[str, tuple[ValueFamily, ...]] = {
    "name": (
        _faker_family("first_name", "first_name"),
        ValueFamily("full_name", _full_name, localised=True),
        ValueFamily("invented_name", lambda rng, _: invented_word(rng, rng.randint(2, 3)).capitalize(), held_out=True),
    ),
    "city": (
        _faker_family("faker_city", "city"),
        ValueFamily(
            "invented_city",
            lambda rng, _: rng.choice(("Port ", "San ", "New ", "Lake ", "")) + invented_word(rng, 3).capitalize(),
            held_out=True,
        ),
    ),
    "country": (_faker_family("faker_country", "country"),),
    "job": (ValueFamily("faker_job", _job, localised=True),),
    "company": (_faker_family("faker_company", "company"),),
    "colour": (
        ValueFamily("basic_colour", _pick(_BASIC_COLOURS)),
        ValueFamily("faker_colour", _colour, localised=True),
    ),
    "food": (
        ValueFamily("food", _pick(_FOODS)),
        ValueFamily("dish", _pick(_FOOD_DISHES)),
        ValueFamily("adjective_food", lambda rng, _: f"{rng.choice(_FOOD_ADJECTIVES)} {rng.choice(_FOODS)}"),
        ValueFamily("world_dish", _pick(_WORLD_DISHES), held_out=True),
    ),
    "pet": (
        ValueFamily("animal", _pick(_ANIMALS)),
        ValueFamily("two_word_animal", _pick(_ANIMALS_TWO)),
        ValueFamily("exotic_pet", _pick(_EXOTIC_PETS), held_out=True),
    ),
    "hobby": (
        ValueFamily("hobby", _pick(_HOBBIES)),
        ValueFamily("two_word_hobby", _pick(_HOBBIES_TWO)),
        ValueFamily("rare_hobby", _pick(_RARE_HOBBIES), held_out=True),
    ),
    "age": (ValueFamily("age", lambda rng, _: str(rng.randint(5, 99))),),
    "number": (
        ValueFamily("integer", lambda rng, _: number(rng)),
        ValueFamily("decimal", lambda rng, _: f"{rng.randint(0, 99)}.{rng.randint(1, 99)}", held_out=True),
    ),
    "birthday": (
        ValueFamily("month_day", lambda rng, _: "{1} {0}".format(*_day_month(rng))),
        ValueFamily("day_month", lambda rng, _: "{} {}".format(*_day_month(rng))),
        ValueFamily("ordinal_date", lambda rng, _: "the {} of {}".format(*_ordinal_day(rng)), held_out=True),
    ),
    "codeword": (
        ValueFamily("invented_word", lambda rng, _: invented_word(rng, rng.randint(2, 3))),
        ValueFamily(
            "word_with_digits", lambda rng, _: invented_word(rng, 2) + str(rng.randint(10, 999)), held_out=True
        ),
    ),
}
"""Every slot's value families. Hand-written pools have held-out partners; Faker families are
held out through ``HELD_OUT_LOCALES``."""


SLOTS: tuple[str, ...] = tuple(FAMILIES)

RESERVED: frozenset[str] = frozenset(v.lower() for pool in (_EXOTIC_PETS, _WORLD_DISHES, _RARE_HOBBIES) for v in pool)
"""The hand-written held-out pools: never a training value, always an unseen one."""


def families(slot: str, split: ValueSplit) -> tuple[ValueFamily, ...]:
    """The families a split may draw ``slot`` from: training ones, or the held-out ones plus localised
    ones (which the unseen split draws in held-out locales)."""
    if split == "train":
        return tuple(f for f in FAMILIES[slot] if not f.held_out)
    return tuple(f for f in FAMILIES[slot] if f.held_out or f.localised)


def draw_value(slot: str, split: ValueSplit, rng: random.Random) -> str:
    """One value for ``slot``; never a held-out-partition value for ``train``, always one for ``unseen``.

    Slots with neither a localised nor a held-out family (``age``) draw their unseen values from the
    partition alone.
    """
    options = families(slot, split) or FAMILIES[slot]
    want_held_out = split == "unseen"
    for _ in range(1000):
        family = rng.choice(options)
        if family.localised:
            locale = rng.choice(HELD_OUT_LOCALES) if want_held_out else _weighted_locale(rng)
        else:
            locale = "en_US"
        value = " ".join(family.draw(rng, locale).split())
        if usable(value) and held_out_value(value) == want_held_out:
            return value
    raise RuntimeError(f"no usable {split} value for slot {slot!r} in 1000 draws")  # pragma: no cover


def _weighted_locale(rng: random.Random) -> str:
    names = [name for name, _ in TRAIN_LOCALES]
    weights = [w for _, w in TRAIN_LOCALES]
    return rng.choices(names, weights)[0]
