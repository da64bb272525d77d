"""Turns that need no memory: greetings (answered with a greeting), small talk, questions about
the assistant, arithmetic and counting.

They sit between a fact and its question so the STM has to keep the fact while other
interactions are written into it. Their wording varies like the facts' does, so the model cannot
tell a distractor from a fact by its template alone. None of them states a fact about the user.
"""

from __future__ import annotations

import random

from .dialogues import Turn, distractor
from .grammar import render

GREETINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "[Hi|Hello|Hey|Hi there|Hello there|Hey there][!|.|]",
        ("Hello! How can I help you today?", "Hi! Nice to hear from you.", "Hello! What's on your mind?"),
    ),
    ("Good morning[!|.|]", ("Good morning! How are you today?", "Good morning to you too!")),
    ("Good evening[!|.|]", ("Good evening! How can I help?", "Good evening to you too!")),
    (
        "[Hi|Hello|Hey][,|!] how are you[ doing| today|]?",
        ("Hello! I'm doing well, thanks. How are you?", "Hi! I'm fine, thank you."),
    ),
    ("[Hey|Hi], how's it going?", ("Hi! It's going well, thanks for asking.", "Hey! All good here.")),
    ("[Hi|Hello], nice to meet you[!|.]", ("Nice to meet you too!", "Hello! Nice to meet you too.")),
)
"""(query template, possible answers): every answer is itself a greeting."""

SMALL_TALK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("How are you[ doing| today|]?", ("I'm fine, thanks for asking.", "I'm doing well, thank you.")),
    ("[Thanks|Thank you|Thanks a lot|Cheers][!|.]", ("You're welcome.", "Happy to help!", "Any time.")),
    ("What['s| is] your name?", ("I'm a small reactive model with a short-term memory.",)),
    ("Who are you?", ("I'm a small reactive model with a short-term memory.",)),
    ("What can you do?", ("I can remember what you tell me during our chat.",)),
    (
        "[Tell me a joke|Do you know a joke|Make me laugh][.|?|!]",
        (
            "Why did the cat sit on the computer? To keep an eye on the mouse.",
            "What do you call a sleeping bull? A bulldozer.",
        ),
    ),
    ("[Can|Could] you help me?", ("Of course, ask me anything.", "Sure, what do you need?")),
    ("[Nice|Cool|Great|Interesting][.|!]", ("Glad you think so!", "I think so too.")),
    ("[Okay|OK|Alright|Sure][.|!|]", ("Okay!", "Alright.")),
    ("What['s| is] the weather like?", ("I can't see outside, sorry.", "I don't have a window, sadly.")),
    ("What time is it?", ("I can't see a clock, sorry.",)),
    ("Do you like [music|movies|books|sport]?", ("I don't have tastes of my own, but I like hearing about yours.",)),
    ("What colo[u|]r is the sky?", ("The sky is blue.",)),
    ("What do bees make?", ("Bees make honey.",)),
    ("Is the sun hot?", ("Yes, the sun is very hot.",)),
    ("Do fish swim?", ("Yes, fish swim in water.",)),
    ("What is the opposite of [up|hot|big]?", ()),
    ("Say something nice.", ("You are doing great today.",)),
    (
        "I['m| am] [tired|bored|happy|a bit sleepy] today.",
        ("I hope the rest of your day goes well.", "Thanks for telling me."),
    ),
    ("[Bye|Goodbye|See you later|Talk soon][!|.]", ("Goodbye! Talk to you soon.", "Bye! Come back any time.")),
)
_OPPOSITES = {"up": "down", "hot": "cold", "big": "small"}


def greeting(rng: random.Random) -> Turn:
    """A greeting and a greeting back."""
    template, answers = rng.choice(GREETINGS)
    return Turn(render(template, rng), rng.choice(answers), "greeting")


def small_talk(rng: random.Random) -> Turn:
    template, answers = rng.choice(SMALL_TALK)
    query = render(template, rng)
    if not answers:  # the opposites: the answer depends on the word drawn
        word = next(w for w in _OPPOSITES if w in query)
        return Turn(query, f"The opposite of {word} is {_OPPOSITES[word]}.")
    return Turn(query, rng.choice(answers))


def chitchat(rng: random.Random) -> Turn:
    """One memory-free turn: a greeting, small talk, or the arithmetic/counting/day distractors."""
    r = rng.random()
    if r < 0.15:
        return greeting(rng)
    if r < 0.65:
        return small_talk(rng)
    return distractor(rng)
