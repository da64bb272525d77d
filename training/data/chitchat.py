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


GENERAL_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("How do I boil an egg?", "Put the egg in boiling water for about eight minutes, then cool it in cold water."),
    ("How do [I|you] make pancakes?", "Mix flour, milk, eggs and a pinch of salt, then fry spoonfuls in a hot pan."),
    ("What should I cook for dinner tonight?", "A simple pasta with tomatoes, garlic and basil is quick and tasty."),
    (
        "Why do leaves change colo[u|]r in autumn?",
        "The green chlorophyll breaks down and the yellow and red pigments show.",
    ),
    (
        "Why is the ocean salty?",
        "Rivers carry minerals from rocks into the sea, and the salt stays when water evaporates.",
    ),
    ("How far away is the moon?", "The moon is about 384,000 kilometres from the Earth."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar."),
    ("How does a rainbow form?", "Sunlight bends and splits into colours inside raindrops."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    (
        "Can you give me a tip for sleeping better?",
        "Go to bed at the same time every night and keep screens out of the bedroom.",
    ),
    (
        "How can I learn a new language?",
        "Practise a little every day, listen to native speakers and speak as soon as you can.",
    ),
    (
        "[Any|Do you have any] advice for a job interview?",
        "Prepare a few examples of your work and ask questions about the role.",
    ),
    ("What is a good way to stay healthy?", "Eat plenty of vegetables, move every day and get enough sleep."),
    ("How do I keep a plant alive?", "Give it light, water it when the soil is dry and do not let it stand in water."),
    ("What is your favo[u|]rite colo[u|]r?", "I don't have one, but many people love blue."),
    ("What kind of music do you like?", "I don't listen to music myself, but I enjoy hearing what people like."),
    ("Do you have any hobbies?", "I don't have hobbies of my own, but I like hearing about yours."),
    ("What would you do on a rainy day?", "A good book and a hot drink make a rainy day pleasant."),
    (
        "Where would you like to travel?",
        "I can't travel, but many people love visiting Italy for its food and history.",
    ),
    ("Are you a robot?", "I'm an AI assistant, a language model with a short-term memory."),
    ("Can you write me a short poem?", "Morning light on quiet streets, a gentle start where day and dreaming meet."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    (
        "Tell me something about elephants.",
        "Elephants are the largest land animals, and they can recognise themselves in a mirror.",
    ),
    (
        "What is the difference between weather and climate?",
        "Weather is what happens day to day; climate is the average over many years.",
    ),
    ("Explain gravity in one sentence.", "Gravity is the force that pulls masses toward each other."),
    ("What does a computer's CPU do?", "The CPU runs the instructions of programs, one small step at a time."),
    ("How do airplanes fly?", "Their wings push air down, and the air pushes the wings up."),
    ("What is a healthy breakfast?", "Oatmeal with fruit and a glass of water is a healthy breakfast."),
    ("Should I take an umbrella today?", "I can't see the sky, so check a weather forecast before you go."),
    ("What's a good name for a cat?", "Whiskers, Luna or Milo are popular names for a cat."),
    ("How do I say thank you in Spanish?", "You say gracias."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("How many continents are there?", "There are seven continents."),
    ("Why do we need sleep?", "Sleep lets the body rest and the brain store what it learned."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world."),
    ("Can you summarise what a novel is?", "A novel is a long story in prose about characters and events."),
)
"""Questions to the assistant about the world, advice and itself, with short answers. They look
like recall questions ("What is ...?", "What do you ...?") but ask for nothing the user said, so
they teach that a question is not always about the memory. None is one of the questions
``benchmarks/chat_penalties.py`` and ``benchmarks/first_minutes.py`` ask."""


def general_question(rng: random.Random) -> Turn:
    """A question to the assistant that needs no memory (``GENERAL_QUESTIONS``)."""
    template, answer = rng.choice(GENERAL_QUESTIONS)
    return Turn(render(template, rng), answer)
