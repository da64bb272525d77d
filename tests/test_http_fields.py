"""Every request field works or is refused with a 400 naming it, over real HTTP and the ``openai`` client.

Stop sequences are matched on the streamed text, never shown, and the memory takes in exactly the
text the client saw; docs/http.md's field table is the code's (parsed here).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

import rxruntime
from rxruntime.engine import Engine
from rxruntime.serving.http.fields import CHAT_COMPLETIONS, COMPLETIONS, RESPONSES
from rxruntime.serving.http.stops import StopMatcher

from .http_server import JULIA, client, served

DOCS = Path(__file__).resolve().parents[1] / "docs" / "http.md"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with rxruntime.load("small") as engine:
        yield engine


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with served(engine) as (url, _):
        yield url


def _greedy_answer(c: openai.OpenAI) -> str:
    reply = c.chat.completions.create(
        model="rxt", messages=[{"role": "user", "content": JULIA}], temperature=0, max_tokens=24
    )
    text = reply.choices[0].message.content
    assert text and len(text) > 6, text
    return text


def _stop_in(text: str) -> tuple[str, str]:
    """A stop sequence from the middle of ``text`` and the answer it leaves."""
    start = len(text) // 2
    stop = text[start : start + 3]
    return stop, text[: text.index(stop)]


# ---------------------------------------------------------------------- stop
def test_stop_matcher_holds_back_only_a_possible_match() -> None:
    m = StopMatcher(("END", "xy"))
    assert m.feed("abcE") == "abc"  # "E" may start END
    assert m.feed("N") == ""
    assert m.feed("D tail") == ""  # matched: nothing after it, the END itself hidden
    assert m.stopped and m.shown == "abc"
    m = StopMatcher(("END",))
    assert m.feed("aE") == "a"
    assert m.feed("x") == "Ex"  # not a match after all: released at once
    assert m.feed("E") == "" and m.flush() == "E"
    assert m.shown == "aExE"


def test_chat_stop_sequence_streams_the_text_before_it(url: str) -> None:
    c = client(url)
    full = _greedy_answer(c)
    stop, before = _stop_in(full)
    stream = c.chat.completions.create(
        model="rxt",
        messages=[{"role": "user", "content": JULIA}],
        temperature=0,
        max_tokens=24,
        stop=[stop, "never-in-the-answer"],
        stream=True,
    )
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == before
    assert finish == "stop"
    reply = c.chat.completions.create(
        model="rxt", messages=[{"role": "user", "content": JULIA}], temperature=0, max_tokens=24, stop=stop
    )
    assert reply.choices[0].message.content == before


def test_responses_stop_writes_the_shown_text_to_memory(url: str, engine: Engine) -> None:
    c = client(url)
    seeded: Any = {"seed": 11}  # the same starting STM for both conversations: the same greedy answer
    full = c.responses.create(
        model="rxt",
        input=JULIA,
        temperature=0,
        max_output_tokens=24,
        conversation=c.conversations.create(extra_body=seeded).id,
    ).output_text
    stop, before = _stop_in(full)
    conv = c.conversations.create(extra_body=seeded)
    events = list(
        c.responses.create(
            model="rxt",
            input=JULIA,
            conversation=conv.id,
            temperature=0,
            max_output_tokens=24,
            stream=True,
            extra_body={"stop": [stop]},
        )
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == before
    done = next(e for e in events if e.type == "response.completed")
    assert done.response.output_text == before
    kinds: list[str] = [e.type for e in events]
    assert kinds[-1] == "rxrt.memory.updated"
    conversation = done.response.conversation
    assert conversation is not None
    stm, version, _ = engine.snapshot(conversation.id)
    assert version == 1  # one write: the shown answer, not the decoded one too
    ref = engine.conversation(seed=11)
    try:
        ref.memorize(JULIA, before)
        ref_stm, _, _ = engine.snapshot(ref.id)
    finally:
        ref.delete()
    assert torch.allclose(stm, ref_stm, atol=1e-5)


def test_empty_and_null_stop_are_accepted(url: str) -> None:
    c = client(url)
    stops: list[Any] = [[], None]
    for stop in stops:
        body: dict[str, Any] = {"stop": stop}
        reply = c.chat.completions.create(
            model="rxt", messages=[{"role": "user", "content": JULIA}], max_tokens=4, extra_body=body
        )
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_bad_stop_values_are_refused(url: str) -> None:
    c = client(url)
    for stop in (["a", "b", "c", "d", "e"], [""], [1]):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(
                model="rxt", messages=[{"role": "user", "content": JULIA}], extra_body={"stop": stop}
            )
        assert err.value.body["param"] == "stop"  # type: ignore[index]


# ---------------------------------------------------------------------- the other fields
def test_seed_user_and_max_completion_tokens_work(url: str) -> None:
    c = client(url)
    answers = {
        c.chat.completions.create(
            model="rxt",
            messages=[{"role": "user", "content": JULIA}],
            seed=7,
            temperature=1.0,
            max_completion_tokens=5,
            user="user-1",
        )
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(answers) == 1  # same seed, same answer
    reply = c.chat.completions.create(
        model="rxt", messages=[{"role": "user", "content": JULIA}], max_completion_tokens=3, user="u"
    )
    assert reply.usage is not None and reply.usage.completion_tokens <= 3
    response = c.responses.create(model="rxt", input=JULIA, max_output_tokens=3, store=False, user="u-2")
    assert response.usage is not None and response.usage.output_tokens <= 3
    assert response.user == "u-2"


# ---------------------------------------------------------------------- top_k (our extension)
def _three_endpoints(c: openai.OpenAI, **sampling: Any) -> tuple[str, str, str]:
    """The answer to JULIA from chat, completions and responses at ``seed`` 5, each from the same
    starting STM (chat replays from seed 0; the others continue a conversation opened at seed 11)."""
    extra = sampling.pop("extra_body", {})
    chat = c.chat.completions.create(
        model="rxt", messages=[{"role": "user", "content": JULIA}], max_tokens=16, seed=5, extra_body=extra, **sampling
    )
    conv = c.conversations.create(extra_body={"seed": 11})
    completion = c.completions.create(
        model="rxt", prompt=JULIA, max_tokens=16, seed=5, extra_body={**extra, "conversation": conv.id}, **sampling
    )
    conv = c.conversations.create(extra_body={"seed": 11})
    response = c.responses.create(
        model="rxt",
        input=JULIA,
        conversation=conv.id,
        max_output_tokens=16,
        extra_body={**extra, "seed": 5},
        **sampling,
    )
    texts = (chat.choices[0].message.content or "", completion.choices[0].text, response.output_text)
    assert all(texts), texts
    return texts


def test_top_k_1_gives_the_greedy_text_on_every_endpoint(url: str) -> None:
    """``top_k`` through the official SDK's ``extra_body``: with only the likeliest token left,
    sampling at temperature 2 gives what greedy decoding gives, where without it the same seed
    samples another text."""
    c = client(url)
    greedy = _three_endpoints(c, temperature=0)
    assert _three_endpoints(c, temperature=2.0, extra_body={"top_k": 1}) == greedy
    sampled = _three_endpoints(c, temperature=2.0)
    assert all(text != plain for text, plain in zip(sampled, greedy)), (sampled, greedy)
    assert _three_endpoints(c, temperature=0, extra_body={"top_k": 0}) == greedy  # 0: off


@pytest.mark.parametrize("value", [-1, 2.5, "3", True, 2**63])
def test_a_bad_top_k_is_a_400_naming_it_on_every_endpoint(url: str, value: Any) -> None:
    c = client(url)
    calls = (
        lambda: c.chat.completions.create(
            model="rxt", messages=[{"role": "user", "content": JULIA}], extra_body={"top_k": value}
        ),
        lambda: c.completions.create(model="rxt", prompt=JULIA, max_tokens=3, extra_body={"top_k": value}),
        lambda: c.responses.create(model="rxt", input=JULIA, store=False, extra_body={"top_k": value}),
    )
    for call in calls:
        with pytest.raises(openai.BadRequestError) as err:
            call()
        body: Any = err.value.body
        assert body["param"] == "top_k" and "top_k" in body["message"], body


def test_penalties_reach_the_sampler_on_chat_and_completions(url: str, engine: Engine) -> None:
    """A penalised HTTP answer is the engine's own answer with the same options from the same
    starting memory (a stateless chat starts from seed 0; the completion runs in a conversation
    made with seed 0), and differs from the unpenalised one (the small model is too sure of its
    answers for a positive penalty to change this one; a negative one makes it repeat itself)."""
    c = client(url)
    query = "apples and apples"
    messages: Any = [{"role": "user", "content": query}]
    answers: list[str] = []
    for presence, frequency in ((0.0, 0.0), (-2.0, 0.0), (0.0, -2.0)):
        conversation = engine.conversation(seed=0)
        want = conversation.ask(
            query, temperature=0.0, max_new_tokens=24, presence_penalty=presence, frequency_penalty=frequency
        )
        conversation.close()
        assert want not in answers, (presence, frequency)
        answers.append(want)
        chat = c.chat.completions.create(
            model="rxt", messages=messages, temperature=0, max_tokens=24,
            presence_penalty=presence, frequency_penalty=frequency,
        )  # fmt: skip
        seeded = c.conversations.create(extra_body={"seed": 0})
        completion = c.completions.create(
            model="rxt", prompt=query, temperature=0, max_tokens=24,
            presence_penalty=presence, frequency_penalty=frequency, extra_body={"conversation": seeded.id},
        )  # fmt: skip
        assert chat.choices[0].message.content == want, (presence, frequency)
        assert completion.choices[0].text == want, (presence, frequency)


@pytest.mark.parametrize("value", [2.5, -3, "1", True])
def test_a_bad_penalty_is_a_400_naming_it(url: str, value: Any) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(openai.BadRequestError) as err:
            client(url).chat.completions.create(
                model="rxt", messages=[{"role": "user", "content": JULIA}], extra_body={name: value}
            )
        body: Any = err.value.body
        assert body["param"] == name, body


REFUSED_CHAT: list[tuple[str, Any]] = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
    ("logit_bias", {"5": 10}),
    ("reasoning_effort", "high"),  # the default model is an Alpha: no thinking modes
    ("not_a_field", 1),
]
REFUSED_RESPONSES: list[tuple[str, Any]] = [
    ("tools", [{"type": "function", "name": "f", "parameters": {}}]),
    ("tool_choice", "required"),
    ("text", {"format": {"type": "json_object"}}),
    ("background", True),
    ("include", ["reasoning.encrypted_content"]),
    ("reasoning", {"effort": "medium"}),
    ("not_a_field", 1),
]


@pytest.mark.parametrize(("name", "value"), REFUSED_CHAT)
def test_chat_fields_we_cannot_honour_are_refused_by_name(url: str, name: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(
            model="rxt", messages=[{"role": "user", "content": JULIA}], extra_body={name: value}
        )
    body: Any = err.value.body
    assert body["param"] in (name, f"{name}.effort"), body
    assert name in body["message"], body


@pytest.mark.parametrize(("name", "value"), REFUSED_RESPONSES)
def test_responses_fields_we_cannot_honour_are_refused_by_name(url: str, name: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(url).responses.create(model="rxt", input=JULIA, store=False, extra_body={name: value})
    body: Any = err.value.body
    assert body["param"] in (name, f"{name}.effort"), body


def test_harmless_values_of_refused_fields_are_accepted(url: str) -> None:
    c = client(url)
    chat = c.chat.completions.create(
        model="rxt",
        messages=[{"role": "user", "content": JULIA}],
        max_tokens=3,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        logprobs=False,
    )
    assert chat.choices[0].message.content is not None
    response = c.responses.create(
        model="rxt", input=JULIA, max_output_tokens=3, store=False, tools=[], tool_choice="auto", background=False
    )
    assert response.status in ("completed", "incomplete")


# ---------------------------------------------------------------------- the documented table
def _doc_table() -> dict[str, dict[str, str]]:
    """docs/http.md's field table: field -> {endpoint: works | refused | ""}."""
    text = DOCS.read_text()
    section = text.split("## Request fields", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name = cells[0].strip("`")
        table[name] = {
            endpoint: (re.match(r"\w+", cell) or re.match("", "")).group(0)  # type: ignore[union-attr]
            for endpoint, cell in zip(("responses", "chat", "completions"), cells[1:4])
        }
    return table


def test_docs_field_table_matches_the_code() -> None:
    table = _doc_table()
    for endpoint, fields in (("responses", RESPONSES), ("chat", CHAT_COMPLETIONS), ("completions", COMPLETIONS)):
        documented = {name: cells[endpoint] for name, cells in table.items() if cells[endpoint] != "—"}
        documented = {name: status for name, status in documented.items() if status}
        code = {name: "works" if field.works else "refused" for name, field in fields.items()}
        assert documented == code, endpoint


# ---------------------------------------------------------------------- reasoning on a Beta model
def test_reasoning_effort_on_a_beta_model_keeps_the_thinking_out_of_the_answer() -> None:
    from .test_rxlm_beta_template import BETA, _case

    with rxruntime.load(_case(BETA), device="cpu") as beta, served(beta) as (beta_url, _):
        c = client(beta_url)
        messages: Any = [{"role": "user", "content": "Hello"}]
        high: Any = {"effort": "high"}
        thought = c.chat.completions.create(
            model="rxt", messages=messages, temperature=0, max_tokens=8, reasoning_effort="high"
        )
        message: Any = thought.choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert isinstance(reasoning, str) and reasoning  # the thinking comes first: 8 tokens of it here
        chunks = list(
            c.chat.completions.create(
                model="rxt", messages=messages, temperature=0, max_tokens=8, reasoning_effort="high", stream=True
            )
        )
        deltas: list[Any] = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
        streamed = "".join((d.model_extra or {}).get("reasoning_content", "") for d in deltas)
        assert streamed == reasoning  # the same thinking, streamed apart from the answer
        assert "".join(d.content or "" for d in deltas) == (message.content or "")
        fast = c.chat.completions.create(model="rxt", messages=messages, max_tokens=4, reasoning_effort="low")
        assert "reasoning_content" not in (fast.choices[0].message.model_extra or {})
        # a starting STM from which this random model thinks at all (some answer [EOS] at once)
        for seed in range(1, 20):
            conv = c.conversations.create(extra_body={"seed": seed})
            response = c.responses.create(
                model="rxt", input="Hello", conversation=conv.id, temperature=0, max_output_tokens=8, reasoning=high
            )
            if response.usage is not None and response.usage.output_tokens:
                break
        kinds = [item.type for item in response.output]
        assert kinds == ["reasoning", "message"]
        assert response.usage is not None
        assert 0 < response.usage.output_tokens_details.reasoning_tokens <= response.usage.output_tokens
        thinking: Any = response.output[0]
        events = list(
            c.responses.create(
                model="rxt",
                input="Hello",
                conversation=c.conversations.create(extra_body={"seed": seed}).id,
                temperature=0,
                max_output_tokens=8,
                reasoning=high,
                stream=True,
            )
        )
        order: list[str] = [str(e.type) for e in events]
        assert order.index("response.reasoning_text.delta") < order.index("response.content_part.added")
        said = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        assert said == thinking.content[0].text  # the same thinking, never in output_text
        done: Any = next(e for e in events if e.type in ("response.completed", "response.incomplete"))
        assert done.response.output_text == response.output_text
