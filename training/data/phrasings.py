"""How people state, correct and ask for facts about themselves, and how the model answers.

Every slot has several *statement* and *question* families (see ``grammar.Family``), each with
inline variation: contractions, synonyms, word order, hedges. Some families are marked
``held_out``: training never renders them, the ``held_out_phrasings`` evaluation split renders
nothing else. Frames put greetings, hedges and filler around a statement or a question, and have
held-out members too.

The answers are fixed per slot ("Your name is {v}.", "I don't know your name."), so a correct
recall can be scored exactly; acknowledgements vary and repeat the value.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from .grammar import Family, capitalise, lower_first, render

PhraseSplit = Literal["train", "held_out"]


@dataclass(frozen=True)
class SlotPhrasing:
    slot: str
    statements: tuple[Family, ...]
    questions: tuple[Family, ...]
    acknowledgements: tuple[str, ...]
    answer: str
    """The one right answer to a question about a stated fact."""
    unknown: str
    """The one right answer to a question about a fact never stated."""


def _f(name: str, *templates: str, held_out: bool = False) -> Family:
    return Family(name, templates, held_out)


PHRASINGS: dict[str, SlotPhrasing] = {
    p.slot: p
    for p in (
        SlotPhrasing(
            "name",
            (
                _f("name.is", "My name is {v}.", "My name's {v}.", "My [first |]name is {v}[, by the way|]."),
                _f("name.i_am", "[I'm|I am] {v}.", "[I'm|I am] {v}, [nice to meet you|pleased to meet you]."),
                _f(
                    "name.call",
                    "[Call me|You can call me|Please call me] {v}.",
                    "[Everyone|My friends] call[s|] me {v}.",
                ),
                _f("name.fronted", "{v} is my name.", "{v}[, that's| is] me."),
                _f("name.goes_by", "I go by {v}.", "The name's {v}.", held_out=True),
            ),
            (
                _f("name.what", "What['s| is] my name?", "What is my name again?"),
                _f("name.remember", "Do you remember my name?", "[Can|Could] you tell me my name?"),
                _f("name.who", "Who am I?", "Do you know who I am?"),
                _f(
                    "name.call_q", "What do [people|my friends] call me?", "Remind me, what was my name?", held_out=True
                ),
            ),
            ("Nice to meet you, {v}[!|.]", "Hello, {v}[!|.]", "Hi {v}, [nice to meet you|good to meet you]."),
            "Your name is {v}.",
            "I don't know your name.",
        ),
        SlotPhrasing(
            "city",
            (
                _f("city.live", "I live in {v}.", "[I'm|I am] living in {v} [now|these days|]."),
                _f("city.home", "My home is in {v}.", "Home for me is {v}."),
                _f("city.moved", "I [moved|just moved] to {v}.", "I've been living in {v} for [a year|ages|a while]."),
                _f("city.fronted", "{v} is where I live.", "{v} is my home[ town|]."),
                _f("city.based", "[I'm|I am] based in {v}.", "These days you'll find me in {v}.", held_out=True),
            ),
            (
                _f("city.where", "Where do I live?", "Where['s| is] my home?"),
                _f("city.which", "Which city do I live in?", "What city [is my home|do I live in]?"),
                _f("city.remember", "Do you remember where I live?", "[Can|Could] you tell me where I live?"),
                _f("city.based_q", "Where am I based?", "Which town did I say was home?", held_out=True),
            ),
            ("{v} sounds lovely.", "Oh, {v} is nice.", "[Nice|Cool], {v}[!|.]", "I hear {v} is [great|lovely]."),
            "You live in {v}.",
            "I don't know where you live.",
        ),
        SlotPhrasing(
            "country",
            (
                _f("country.from", "[I'm|I am] from {v}.", "I come from {v}."),
                _f("country.born", "I was born in {v}.", "I grew up in {v}."),
                _f("country.home", "My home country is {v}.", "{v} is my home country."),
                _f("country.roots", "My roots are in {v}.", "Originally, I'm from {v}.", held_out=True),
            ),
            (
                _f("country.where", "Where am I from?", "Where do I come from?"),
                _f("country.which", "Which country am I from?", "What['s| is] my home country?"),
                _f("country.remember", "Do you remember where I'm from?", "Can you tell me where I come from?"),
                _f("country.origin_q", "Where did I say I grew up?", "Where are my roots?", held_out=True),
            ),
            ("{v}, how interesting.", "Oh, {v}[!|.]", "I'd love to visit {v}."),
            "You are from {v}.",
            "I don't know where you are from.",
        ),
        SlotPhrasing(
            "job",
            (
                _f("job.work_as", "I work as {a}.", "[I'm|I am] {a} by trade."),
                _f("job.is", "My job is {v}.", "My [job|profession|work] is {v}."),
                _f("job.i_am", "[I'm|I am] {a}.", "I've been {a} for [years|a while]."),
                _f("job.living", "I earn my living as {a}.", "For a living, I'm {a}.", held_out=True),
            ),
            (
                _f("job.what", "What['s| is] my job?", "What is my profession?"),
                _f("job.do", "What do I do for [work|a living]?", "What [work|job] do I do?"),
                _f("job.remember", "Do you remember my job?", "Can you tell me what I do?"),
                _f("job.trade_q", "What did I say I do all day?", "How do I earn my living?", held_out=True),
            ),
            ("{v}, [that sounds interesting|nice].", "Being {a} must be interesting.", "{v}, [cool|wow]!"),
            "Your job is {v}.",
            "I don't know your job.",
        ),
        SlotPhrasing(
            "company",
            (
                _f("company.work_at", "I work [at|for] {v}.", "[I'm|I am] employed at {v}."),
                _f("company.is", "My [employer|company] is {v}.", "The company I work for is {v}."),
                _f("company.fronted", "{v} is where I work.", "{v} pays my salary."),
                _f("company.job_at", "I've got a job at {v}.", "I joined {v} [last year|recently].", held_out=True),
            ),
            (
                _f("company.where", "Where do I work?", "Which company do I work [for|at]?"),
                _f("company.employer", "Who['s| is] my employer?", "What company employs me?"),
                _f("company.remember", "Do you remember where I work?", "Can you tell me where I work?"),
                _f("company.joined_q", "Which company did I join?", "Who pays my salary?", held_out=True),
            ),
            ("{v}, [nice|good to know].", "Working at {v} sounds [fun|interesting].", "Oh, {v}[!|.]"),
            "You work at {v}.",
            "I don't know where you work.",
        ),
        SlotPhrasing(
            "colour",
            (
                _f("colour.favourite", "My favo[u|]rite colo[u|]r is {v}.", "My favo[u|]rite colo[u|]r's {v}."),
                _f("colour.like", "I like the colo[u|]r {v} [best|most].", "I love the colo[u|]r {v}."),
                _f("colour.fronted", "{v} is my favo[u|]rite colo[u|]r.", "{v}, that's my favo[u|]rite colo[u|]r."),
                _f("colour.wear", "I always wear something {v}.", "Everything I own is {v}.", held_out=True),
            ),
            (
                _f("colour.what", "What['s| is] my favo[u|]rite colo[u|]r?", "What colo[u|]r do I like best?"),
                _f("colour.which", "Which colo[u|]r do I love?", "Which colo[u|]r is my favo[u|]rite?"),
                _f(
                    "colour.remember",
                    "Do you remember my favo[u|]rite colo[u|]r?",
                    "Can you tell me my favo[u|]rite colo[u|]r?",
                ),
                _f("colour.wear_q", "What colo[u|]r do I always wear?", "Which shade did I say I like?", held_out=True),
            ),
            ("{v} is a [good|lovely|nice] colour.", "Noted, {v}.", "{v}, [nice choice|lovely]."),
            "Your favourite colour is {v}.",
            "I don't know your favourite colour.",
        ),
        SlotPhrasing(
            "food",
            (
                _f("food.favourite", "My favo[u|]rite food is {v}.", "My favo[u|]rite food's {v}."),
                _f("food.love", "I [love|really love|adore] [eating |]{v}.", "I could eat {v} every day."),
                _f("food.fronted", "{v} is my favo[u|]rite food.", "{v}, that's what I like to eat."),
                _f("food.crave", "Nothing beats {v} for me.", "I'm always craving {v}.", held_out=True),
            ),
            (
                _f("food.what", "What['s| is] my favo[u|]rite food?", "What food do I love?"),
                _f("food.eat", "What do I [like|love] to eat?", "What could I eat every day?"),
                _f("food.remember", "Do you remember my favo[u|]rite food?", "Can you tell me what food I love?"),
                _f("food.crave_q", "What am I always craving?", "Which dish did I say I like?", held_out=True),
            ),
            ("{v} is tasty.", "Yum, {v}[!|.]", "Mmm, {v}."),
            "Your favourite food is {v}.",
            "I don't know your favourite food.",
        ),
        SlotPhrasing(
            "pet",
            (
                _f("pet.have", "I have {a}.", "I've got {a}[ at home|]."),
                _f("pet.pet", "I have a pet {v}.", "My pet is {a}."),
                _f("pet.keep", "At home I keep {a}.", "I live with {a}."),
                _f("pet.look_after", "I look after {a}.", "There's {a} waiting for me at home.", held_out=True),
            ),
            (
                _f("pet.what", "What pet do I have?", "What['s| is] my pet?"),
                _f("pet.animal", "Which animal do I keep[ at home|]?", "What animal do I live with?"),
                _f("pet.remember", "Do you remember my pet?", "Can you tell me what pet I have?"),
                _f("pet.waiting_q", "What is waiting for me at home?", "Which animal do I look after?", held_out=True),
            ),
            ("{a} is a great pet.", "How nice, {a}.", "Aww, {a}[!|.]"),
            "You have {a}.",
            "I don't know what pet you have.",
        ),
        SlotPhrasing(
            "hobby",
            (
                _f("hobby.is", "My hobby is {v}.", "My favo[u|]rite hobby is {v}."),
                _f("hobby.enjoy", "I [enjoy|love] {v}.", "On weekends I enjoy {v}."),
                _f("hobby.fronted", "{v} is my hobby.", "{v} is what I do for fun."),
                _f("hobby.free_time", "In my free time I do {v}.", "I spend my spare time on {v}.", held_out=True),
            ),
            (
                _f("hobby.what", "What['s| is] my hobby?", "What hobby do I have?"),
                _f("hobby.fun", "What do I do for fun?", "What do I enjoy on weekends?"),
                _f("hobby.remember", "Do you remember my hobby?", "Can you tell me my hobby?"),
                _f(
                    "hobby.free_q",
                    "How do I spend my free time?",
                    "What did I say I do in my spare time?",
                    held_out=True,
                ),
            ),
            ("{v} sounds fun.", "I see, {v}.", "Oh, {v}[!|.]"),
            "Your hobby is {v}.",
            "I don't know your hobby.",
        ),
        SlotPhrasing(
            "age",
            (
                _f("age.years", "[I'm|I am] {v} years old.", "[I'm|I am] {v}."),
                _f("age.is", "My age is {v}.", "I turned {v} [this year|recently]."),
                _f("age.fronted", "{v} years old, that's me.", "{v} is my age."),
                _f("age.turned", "I celebrated turning {v}.", "I've been around for {v} years.", held_out=True),
            ),
            (
                _f("age.how_old", "How old am I?", "How old did I say I am?"),
                _f("age.what", "What['s| is] my age?", "What age am I?"),
                _f("age.remember", "Do you remember my age?", "Can you tell me how old I am?"),
                _f("age.around_q", "How many years have I been around?", "How many years old am I?", held_out=True),
            ),
            ("{v} is a fine age.", "Noted, {v} years.", "{v}, [great|nice]."),
            "You are {v} years old.",
            "I don't know how old you are.",
        ),
        SlotPhrasing(
            "number",
            (
                _f("number.lucky", "My lucky number is {v}.", "My lucky number's {v}."),
                _f("number.like", "The number I like [most|best] is {v}.", "I [like|love] the number {v}."),
                _f("number.fronted", "{v} is my lucky number.", "{v}, that's my lucky number."),
                _f("number.bet", "I always bet on {v}.", "{v} brings me luck.", held_out=True),
            ),
            (
                _f("number.what", "What['s| is] my lucky number?", "What number is lucky for me?"),
                _f("number.which", "Which number do I like [most|best]?", "Which number is my lucky one?"),
                _f("number.remember", "Do you remember my lucky number?", "Can you tell me my lucky number?"),
                _f("number.bet_q", "Which number do I always bet on?", "What number brings me luck?", held_out=True),
            ),
            ("{v}, good choice.", "Got it, {v}.", "{v}[!|.] Nice number."),
            "Your lucky number is {v}.",
            "I don't know your lucky number.",
        ),
        SlotPhrasing(
            "birthday",
            (
                _f("birthday.is", "My birthday is [on |]{v}.", "My birthday's {v}."),
                _f("birthday.born", "I was born on {v}.", "I celebrate my birthday on {v}."),
                _f("birthday.fronted", "{v} is my birthday.", "{v}, that's my birthday."),
                _f(
                    "birthday.party",
                    "I have my birthday party every year on {v}.",
                    "Every {v} I get a year older.",
                    held_out=True,
                ),
            ),
            (
                _f("birthday.when", "When is my birthday?", "When['s| is] my birthday?"),
                _f("birthday.what", "What date is my birthday?", "On what day was I born?"),
                _f("birthday.remember", "Do you remember my birthday?", "Can you tell me when my birthday is?"),
                _f(
                    "birthday.party_q",
                    "When do I have my birthday party?",
                    "On which date do I get older?",
                    held_out=True,
                ),
            ),
            ("{v}, noted.", "I'll remember {v}.", "{v}[!|.] A good day."),
            "Your birthday is {v}.",
            "I don't know your birthday.",
        ),
        SlotPhrasing(
            "codeword",
            (
                _f("codeword.secret", "My secret word is {v}.", "My secret word's {v}."),
                _f("codeword.password", "The password is {v}.", "Our password is {v}."),
                _f("codeword.remember", "Remember this word: {v}.", "Please remember the word {v}."),
                _f("codeword.keep", "Keep this code word safe: {v}.", "The magic word is {v}.", held_out=True),
            ),
            (
                _f("codeword.what", "What['s| is] my secret word?", "What is the password?"),
                _f("codeword.which", "Which word did I ask you to remember?", "What word did I give you?"),
                _f("codeword.remember", "Do you remember my secret word?", "Can you tell me the password?"),
                _f("codeword.keep_q", "What was the code word?", "What is the magic word?", held_out=True),
            ),
            ("Got it, {v}.", "I'll remember {v}.", "{v}, noted."),
            "Your secret word is {v}.",
            "I don't know your secret word.",
        ),
    )
}

# Frames around a statement: (prefix, suffix). A prefix ending in "," lower-cases what follows.
STATEMENT_FRAMES = (
    _f("frame.plain", ""),
    _f("frame.greeting", "[Hi|Hello|Hey|Hi there][!|.|,] "),
    _f("frame.by_the_way", "[By the way|Oh, by the way|Just so you know|Also],"),
    _f("frame.well", "[Well|So|Okay|Um|Right],"),
    _f("frame.let_me", "[Let me tell you something|Here's something about me|A fact about me][.|:] "),
    _f("frame.fyi", "For the record,", "In case you were wondering,", held_out=True),
)
QUESTION_FRAMES = (
    _f("qframe.plain", ""),
    _f("qframe.quick", "[Quick question|Question|Hey|Okay|So][:|,]"),
    _f("qframe.memory", "[Let's see if you remember|Memory test|Test time][.|!|:] "),
    _f("qframe.sorry", "[Sorry, I forgot|I can't remember|I've forgotten][.|,|:] "),
    _f("qframe.wonder", "I wonder,", "Out of curiosity,", held_out=True),
)
CORRECTION_FRAMES = (
    "[Actually|Sorry|Oops|Wait|No wait|Correction][,|:]",
    "[Sorry, I got that wrong|I made a mistake|Let me correct that|That was wrong][.|:] ",
    "[I misspoke|Scratch that|My mistake][.|,] ",
)
CORRECTION_ACKS = (
    "[Okay|Got it|Thanks|No problem], {v} [then|it is|instead].",
    "Thanks for the correction: {v}.",
    "[Updated|Noted]: {v}.",
)
GREETING_ACK_PREFIXES = ("Hello! ", "Hi! ", "Hi there! ")


def frame(family: Family, rng: random.Random, body: str, keep_case: bool = False) -> str:
    """``body`` after a prefix rendered from ``family``, capitalised as a sentence.

    The body's first letter is capitalised (lower-cased after a prefix ending in ","; the pronoun
    "I" stays), unless ``keep_case``: a body that starts with a value keeps the value as said.
    """
    prefix = render(rng.choice(family.templates), rng).strip()
    if prefix.endswith(","):
        return f"{prefix} {body if keep_case else lower_first(body)}"
    body = body if keep_case else capitalise(body)
    return f"{capitalise(prefix)} {body}" if prefix else body


def families_for(families: tuple[Family, ...], split: PhraseSplit) -> tuple[Family, ...]:
    want = split == "held_out"
    return tuple(f for f in families if f.held_out == want)
