"""Log probabilities: the turn option ``logprobs=k`` gives each ``Token`` the chosen token's
log-probability under the model's own distribution and its ``k`` most probable alternatives.

Each reported value is checked against ``log_softmax`` of the torch model's logits for the same
position, computed independently by one teacher-forced forward pass (no KV cache, no C step, no
sampler), on the torch decode path and on the C step. A batch where only some rows ask reports
for those rows alone, and a batch where none asks never computes them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import anyio
import msgpack
import pytest
import torch

import rxruntime
from rxruntime import events
from rxruntime.backend import AnswerStats, TurnRequest
from rxruntime.conversation import EventBuffer, Waker
from rxruntime.engine import Engine
from rxruntime.errors import InvalidOptionError
from rxruntime.events import QueryReceived, Token, TokenLogprob
from rxruntime.models import DecodeBatch, JoinRequest, RxTModel, SamplingParams, generation, native
from rxruntime.models.sampler import token_logprobs
from rxruntime.serving.client import Client
from rxruntime.serving.zmq.server import Server

from .conftest import tiny_model
from .engine_util import collect, in_one_prefill, teacher_forced_logprobs

QUERY = "My name is Julia."
HAS_CC = shutil.which(os.environ.get("CC") or "cc") is not None


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """The shipped model in float32, so the C step and torch agree to float tolerance."""
    with rxruntime.load("small", weights="fp32") as engine:
        yield engine


def _turn(engine: Engine, cid: str, **options: Any) -> tuple[torch.Tensor, list[int], list[Token]]:
    """(the STM the turn read, its prompt ids, its Token events)."""
    conv = engine.conversation(cid, seed=11)
    stm = engine.snapshot(cid)[0]
    got, error = collect(conv.interact(QUERY, **options), timeout=60)
    assert error is None, error
    prompt = next(e for e in got if isinstance(e, QueryReceived)).token_ids
    conv.close()
    return stm, list(prompt), [e for e in got if isinstance(e, Token)]


def _check_against_model(engine: Engine, stm: torch.Tensor, prompt: list[int], tokens: list[Token], k: int) -> None:
    reference = teacher_forced_logprobs(engine.model, stm, prompt, [t.token_id for t in tokens])
    for token, ref in zip(tokens, reference):
        (entry,) = token.logprobs
        assert entry.token_id == token.token_id
        assert entry.logprob == pytest.approx(float(ref[token.token_id]), abs=1e-4)
        assert token.logprob == entry.logprob
        assert len(entry.top) == k
        values = [alt.logprob for alt in entry.top]
        assert values == sorted(values, reverse=True)
        best = ref.topk(k)
        assert values == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.text == engine.tokenizer.token_piece(entry.token_id)
        assert all(alt.text == engine.tokenizer.token_piece(alt.token_id) for alt in entry.top)


@pytest.mark.parametrize("path", ["torch", "native"])
def test_greedy_logprobs_are_the_models_log_softmax(engine: Engine, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "native" and not (HAS_CC and native.enabled()):
        pytest.skip("no C compiler: the C decode step cannot be built")
    torch_steps = [0]
    kernel = RxTModel._decode_kernel

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        torch_steps[0] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(RxTModel, "_decode_kernel", counted)
    engine.model.native_decode = path == "native"
    try:
        stm, prompt, tokens = _turn(engine, f"greedy-{path}", logprobs=4, temperature=0, max_new_tokens=16)
    finally:
        engine.model.native_decode = True
    assert len(tokens) >= 3, tokens
    assert (torch_steps[0] == 0) == (path == "native")  # the C step's logits, or torch's
    _check_against_model(engine, stm, prompt, tokens, 4)
    for token in tokens:  # greedy: the chosen token is the most probable one
        assert token.logprobs[0].top[0].token_id == token.token_id


def test_sampled_turns_report_the_raw_distribution_not_the_tempered_one(engine: Engine) -> None:
    options = {"temperature": 1.6, "top_k": 6, "seed": 5, "max_new_tokens": 12}
    stm, prompt, tokens = _turn(engine, "sampled", logprobs=8, **options)
    _check_against_model(engine, stm, prompt, tokens, 8)  # 8 alternatives though top_k is 6
    reference = teacher_forced_logprobs(engine.model, stm, prompt, [t.token_id for t in tokens])
    tempered = torch.log_softmax(reference / 1.6, dim=-1)  # log_softmax is shift-invariant: logits/T
    gaps = [abs(t.logprobs[0].logprob - float(tempered[i, t.token_id])) for i, t in enumerate(tokens)]
    assert max(gaps) > 1e-2  # the tempered distribution would have given other numbers
    _, _, plain = _turn(engine, "sampled-plain", **options)  # the same seed without logprobs: the same answer
    assert [t.token_id for t in plain] == [t.token_id for t in tokens]
    assert all(t.logprobs == () and t.logprob is None for t in plain)


def test_zero_alternatives_reports_the_chosen_token_alone(engine: Engine) -> None:
    stm, prompt, tokens = _turn(engine, "zero", logprobs=0, max_new_tokens=6)
    _check_against_model(engine, stm, prompt, tokens, 0)


def test_a_batch_with_one_row_asking_reports_for_that_row_only(engine: Engine) -> None:
    asking = engine.conversation("mixed-ask", seed=11)
    silent = engine.conversation("mixed-silent", seed=11)
    stm = engine.snapshot("mixed-ask")[0]
    (ask_events, e1), (silent_events, e2) = in_one_prefill(
        engine,
        [asking.interact(QUERY, logprobs=3, max_new_tokens=10), silent.interact(QUERY, max_new_tokens=10)],
    )
    assert e1 is None and e2 is None
    asked = [e for e in ask_events if isinstance(e, Token)]
    quiet = [e for e in silent_events if isinstance(e, Token)]
    assert [t.token_id for t in asked] == [t.token_id for t in quiet]  # same STM, greedy: same answer
    assert all(t.logprobs == () for t in quiet)
    prompt = next(e for e in ask_events if isinstance(e, QueryReceived)).token_ids
    _check_against_model(engine, stm, list(prompt), asked, 3)


def test_decode_batch_computes_logprobs_only_for_rows_that_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(seed=3)
    stm = model.init_stm(3, torch.Generator().manual_seed(1), std=1.0)
    greedy = SamplingParams(temperature=0.0)
    calls: list[int] = []
    real = token_logprobs

    def counted(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        calls.append(logits.shape[0])
        return real(logits, tokens, k)

    monkeypatch.setattr(generation, "token_logprobs", counted)
    batch = DecodeBatch(model, 4)
    batch.join([JoinRequest("a", [2, 4, 9], stm[0], greedy, 0), JoinRequest("b", [2, 4, 8], stm[1], greedy, 0)])
    batch.step()
    assert calls == [] and batch.logprobs == {}  # nobody asked: no log_softmax at all
    logits: list[torch.Tensor] = []
    step = model.decode_step

    def capture(*args: Any) -> torch.Tensor:
        out = step(*args)
        logits.append(out.clone())
        return out

    monkeypatch.setattr(model, "decode_step", capture)
    first = batch.join([JoinRequest("c", [2, 4, 10, 11], stm[2], greedy, 0, logprobs=2)])
    assert calls == [1] and set(batch.logprobs) == {"c"}
    assert len(batch.logprobs["c"].top) == 2 and batch.logprobs["c"].top[0][0] == int(first[0])
    batch.leave("a")  # "c" moves into row 0: its request moves with it
    tokens = batch.step()
    assert calls == [1, 1] and set(batch.logprobs) == {"c"}
    row = batch.row_of("c")
    expected = torch.log_softmax(logits[-1][row], dim=-1)
    reported = batch.logprobs["c"]
    assert reported.logprob == pytest.approx(float(expected[tokens[row]]), abs=1e-5)
    assert [i for i, _ in reported.top] == expected.topk(2).indices.tolist()


def test_token_logprobs_gathers_each_rows_token() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    chosen, values, ids = token_logprobs(logits, torch.tensor([0, 0]), 2)
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(chosen, expected[:, 0])
    assert ids.tolist() == [[2, 1], [0, 1]]
    torch.testing.assert_close(values, expected.gather(1, ids))


@pytest.mark.parametrize("value", [-1, 21, True, 2.0, "3"])
def test_bad_logprobs_values_are_refused_by_name(engine: Engine, value: object) -> None:
    conv = engine.conversation()
    with pytest.raises(InvalidOptionError, match="logprobs"):
        conv.interact(QUERY, logprobs=value)
    conv.close()


def test_the_backend_api_refuses_bad_logprobs_too(engine: Engine) -> None:
    conv = engine.conversation("direct-logprobs")
    errors: list[Exception] = []

    class Listener:
        def on_token(self, token_id: int, position: int, logprobs: TokenLogprob | None = None) -> None:
            pass

        def on_answer(self, token_ids: tuple[int, ...], finish_reason: Any, stats: AnswerStats) -> None:
            pass

        def on_error(self, exc: Exception, stm_version: int) -> None:
            errors.append(exc)

    request = TurnRequest(conv.id, engine.next_turn(conv.id), (2, 4, 10, 5), engine.default_sampling, logprobs=50)
    engine.start_turn(request, Listener())
    assert engine.wait_idle(conv.id, 10)
    assert len(errors) == 1 and isinstance(errors[0], InvalidOptionError) and "logprobs" in str(errors[0])
    conv.close()


def test_token_logprobs_survive_the_wire() -> None:
    alt = TokenLogprob(7, "b", -2.5)
    token = Token("c", 1, 5, "a", 0, logprobs=(TokenLogprob(5, "a", -0.25, (TokenLogprob(5, "a", -0.25), alt)),))
    again = events.unpack(events.pack(token))
    assert again == token and isinstance(again, Token) and again.logprobs[0].top[1] == alt
    assert events.unpack(events.pack(Token("c", 1, 5, "a", 0))) == Token("c", 1, 5, "a", 0)
    bad = {**token.to_dict(), "logprobs": [[5, "a"]]}
    with pytest.raises(ValueError, match="logprob"):
        events.unpack(msgpack.packb(bad))


def test_a_remote_conversation_gets_the_same_logprobs_over_zmq(engine: Engine) -> None:
    server = Server(engine, "tcp://127.0.0.1:*").start()
    client = Client(server.endpoint, timeout=30)
    try:
        remote = client.open()
        stm = engine.snapshot(remote.id)[0]
        got, error = collect(remote.interact(QUERY, logprobs=2, max_new_tokens=8), timeout=60)
    finally:
        client.close()
        server.stop()
    assert error is None, error
    tokens = [e for e in got if isinstance(e, Token)]
    prompt = next(e for e in got if isinstance(e, QueryReceived)).token_ids
    assert tokens and all(len(t.logprobs) == 1 for t in tokens)
    _check_against_model(engine, stm, list(prompt), tokens, 2)


def test_a_slow_consumer_gets_every_tokens_logprob_in_merged_tokens() -> None:
    entries = [TokenLogprob(i, str(i), -float(i)) for i in range(3)]

    async def fill() -> tuple[object, object]:  # the buffer wakes an event loop: run in one
        buf = EventBuffer(1, "coalesce", Waker(), on_overflow=lambda: None)
        for i, entry in enumerate(entries):
            buf.on_next(Token("c", 1, i, str(i), i, logprobs=(entry,)))
        return buf.pop(), buf.pop()

    merged, nothing = anyio.run(fill)
    assert nothing is None
    assert isinstance(merged, Token) and merged.text == "012" and merged.count == 3
    assert merged.logprobs == tuple(entries) and merged.logprob == entries[2].logprob


def test_token_bytes_rebuild_the_text_byte_for_byte(engine: Engine) -> None:
    tok = engine.tokenizer
    text = "Hello, Julia! Crème brûlée costs 5€ in Zürich; 日本"
    ids = tok.encode(text)
    joined = b"".join(tok.token_bytes(i) for i in ids)
    assert joined.decode().lstrip(" ") == text
    assert tok.token_bytes(tok.special.eos_id) == b"[EOS]"
    partial = [i for i in ids if not _valid_utf8(tok.token_bytes(i))]
    assert partial, "the text should split a character over tokens"
    assert all("\ufffd" in tok.token_piece(i) for i in partial)


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
