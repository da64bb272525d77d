"""The memory cross-attention keys/values of a conversation's next turn are projected by the memory
update that made its STM (the asynchronous phase), not when the next query arrives.

The memory worker leaves them on the conversation with the new STM (and, when no turn is queued
or under way, projects a just-opened conversation's initial STM); the next turn's join takes them
(once) instead of projecting the STM; anything else that changes the STM (a reset, a loaded
state, an eviction) drops them. The answers are those of projecting at the join.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from rxruntime import Engine
from rxruntime.events import Token
from rxruntime.models import DecodeBatch, JoinRequest, RxTModel, RxTokenizer, SamplingParams

from .conftest import tiny_config
from .engine_util import CORPUS, make_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tok() -> RxTokenizer:
    return RxTokenizer.train(CORPUS, vocab_size=300)


def test_join_takes_given_keys_values_for_some_rows() -> None:
    """Rows that bring their keys/values and rows that do not, in one join: each row's are those
    of its own STM, and the first tokens those of a join that projects every row."""
    model = make_model(seed=3)
    stms = model.init_stm(3, torch.Generator().manual_seed(5), std=1.0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    with torch.inference_mode():
        given = [[(k[0], v[0]) for k, v in model.memory_kv(stms[i : i + 1])] for i in range(3)]
    plain = DecodeBatch(model, 3)
    want = plain.join([JoinRequest(i, p, stms[i], GREEDY, 0) for i, p in enumerate(prompts)])
    mixed = DecodeBatch(model, 3)
    got = mixed.join(
        [JoinRequest(i, p, stms[i], GREEDY, 0, memory_kv=given[i] if i != 1 else None) for i, p in enumerate(prompts)]
    )
    assert torch.equal(want, got)
    for (k, v), (pk, pv) in zip(mixed.memory_kv, plain.memory_kv, strict=True):
        torch.testing.assert_close(k, pk, rtol=0, atol=1e-6)
        torch.testing.assert_close(v, pv, rtol=0, atol=1e-6)
    for i in (0, 2):
        for (k, v), (gk, gv) in zip(mixed.memory_kv, given[i], strict=True):
            assert torch.equal(k[i], gk) and torch.equal(v[i], gv)


def _entry(engine: Engine, conversation_id: str) -> Any:
    return engine._sched.conversations[conversation_id]


def _projected(engine: Engine, conversation_id: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while _entry(engine, conversation_id).memory_kv is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return _entry(engine, conversation_id).memory_kv


def test_an_opened_conversation_has_its_first_turns_keys_values_made_ahead(tok: RxTokenizer) -> None:
    """Opened without a query, a conversation's initial STM is projected by the memory thread;
    its first turn takes them; with a system prompt, the prompt's memory update makes them."""
    model = make_model(seed=7)
    with Engine(model, tok) as engine:
        conv = engine.conversation("fresh", seed=3)
        kv = _projected(engine, "fresh")
        assert kv is not None
        with torch.inference_mode():
            want = model.memory_kv(_entry(engine, "fresh").stm[None])
        for (k, v), (wk, wv) in zip(kv, want, strict=True):
            assert torch.equal(k, wk[0]) and torch.equal(v, wv[0])  # the projection a lone join makes
        conv.ask("Hi", max_new_tokens=2, wait_for_memory=True)
        assert _entry(engine, "fresh").memory_kv is not kv  # taken by the first turn, made anew by its update
        engine.conversation("told", memory_init="You are a helpful assistant.").wait_for_memory(30)
        assert _entry(engine, "told").memory_kv is not None


def test_the_memory_update_leaves_the_next_turns_keys_values(tok: RxTokenizer) -> None:
    model = make_model(seed=4)
    with Engine(model, tok) as engine:
        conv = engine.conversation("a", seed=1)
        assert _projected(engine, "a") is not None  # made ahead for the first turn
        conv.ask("Hi, I'm Ada.", max_new_tokens=4, wait_for_memory=True)
        entry = _entry(engine, "a")
        kv = entry.memory_kv
        assert kv is not None and len(kv) == model.config.num_layers
        with torch.inference_mode():
            want = model.memory_kv(entry.stm[None])
        for (k, v), (wk, wv) in zip(kv, want, strict=True):
            torch.testing.assert_close(k, wk[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(v, wv[0], rtol=0, atol=1e-6)
        stats = engine.stats()
        stm_bytes = entry.stm.nelement() * 4
        kv_bytes = sum(t.nelement() * 4 for pair in kv for t in pair)
        assert stats["resident_bytes"] == stm_bytes + kv_bytes
        conv.ask("What is my name?", max_new_tokens=4, wait_for_memory=False)
        conv.wait_for_memory(30)
        assert _entry(engine, "a").memory_kv is not kv  # used by that turn, made anew by its update
        conv.reset()
        assert _entry(engine, "a").memory_kv is None  # an installed STM: none made for it


def test_answers_equal_projecting_at_the_join(tok: RxTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three turns with the keys/values from the memory updates, and again with every join
    projecting the STM itself: the same answers, token for token."""
    queries = ["Hi, I'm Ada.", "my cat is called Pixel.", "What is my name?"]

    def answers() -> list[str]:
        with Engine(make_model(seed=6), tok) as engine:
            conv = engine.conversation("b", seed=2)
            return [conv.ask(q, max_new_tokens=6, wait_for_memory=True) for q in queries]

    ahead = answers()
    real = DecodeBatch.join

    def projecting(self: DecodeBatch, requests: Any) -> torch.Tensor:
        return real(self, [JoinRequest(r.key, r.prompt, r.stm, r.params, r.seed, r.logprobs) for r in requests])

    monkeypatch.setattr(DecodeBatch, "join", projecting)
    assert answers() == ahead


def test_an_opened_conversation_is_left_to_its_join_while_turns_run(tok: RxTokenizer) -> None:
    """While another conversation's turn runs, the memory thread does not project a just-opened
    conversation (the cores are the decode thread's; its join projects it, batched with the
    other new rows); the first turn then answers as usual."""
    torch.manual_seed(0)
    model = RxTModel(tiny_config(vocab_size=300, max_seq_len=2048)).eval()  # untrained: answers run long
    with Engine(model, tok) as engine:
        started = threading.Event()
        long = engine.conversation("long").interact("Hi", max_new_tokens=2000)
        subscription = long.subscribe(lambda event: started.set() if isinstance(event, Token) else None)
        try:
            assert started.wait(30)
            opened = engine.conversation("opened", seed=3)
            deadline = time.monotonic() + 30
            while engine._memory._opened and time.monotonic() < deadline:  # the memory thread took it up
                time.sleep(0.01)
            time.sleep(0.2)
            assert engine._sched.busy_count >= 1 and _entry(engine, "opened").memory_kv is None
        finally:
            subscription.dispose()  # cancels the long answer
        assert opened.ask("Hi", max_new_tokens=3, wait_for_memory=True) is not None
        assert _projected(engine, "opened") is not None  # its memory update made the next turn's
