"""DecodeBatch holds KV cache and memory keys/values only for the rows in use: it grows on joins and
shrinks when most rows have left, and the conversations in it never notice."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch

from rxruntime.models import DecodeBatch, JoinRequest, SamplingParams

from .conftest import tiny_model

GREEDY = SamplingParams(temperature=0.0)


def _alone(model: object, prompt: list[int], stm: torch.Tensor, steps: int) -> list[int]:
    batch = DecodeBatch(model, 1)  # type: ignore[arg-type]
    out = [int(batch.join([JoinRequest("x", prompt, stm, GREEDY, 0)])[0])]
    return out + [int(batch.step()[0]) for _ in range(steps)]


def test_buffers_follow_the_active_rows_and_answers_do_not_change() -> None:
    model = tiny_model(seed=50)
    stms = model.init_stm(5, torch.Generator().manual_seed(3), std=1.0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
    expected = [_alone(model, p, stms[i], 8) for i, p in enumerate(prompts)]

    batch = DecodeBatch(model, capacity=64)
    assert batch.allocated_rows == 1
    got: dict[Hashable, list[int]] = {}
    first = batch.join([JoinRequest(0, prompts[0], stms[0], GREEDY, 0)])
    got[0] = [int(first[0])]
    for _ in range(3):
        got[0].append(int(batch.step()[0]))
    # Four more join at once while row 0 is mid-answer: 5 rows -> 8 allocated, row 0's cache moves.
    first = batch.join([JoinRequest(i, prompts[i], stms[i], GREEDY, 0) for i in range(1, 5)])
    assert batch.allocated_rows == 8 and batch.cache.k.shape[1] == 8 and batch.memory_kv[0][0].shape[0] == 8
    for i in range(1, 5):
        got[i] = [int(first[i - 1])]
    for step in range(8):
        tokens = batch.step()
        for row, key in enumerate(batch.keys):
            if len(got[key]) < 9:
                got[key].append(int(tokens[row]))
        if step == 4:
            batch.leave(0)  # done (4 + 5 tokens): its row is refilled by the last one
    for key in (1, 2, 3):
        batch.leave(key)
    assert batch.size == 1 and batch.allocated_rows == 2  # halved at 2 of 8 rows in use, and at 1 of 4
    assert got == {i: expected[i] for i in range(5)}
    batch.leave(4)
    assert batch.allocated_rows == 1


def test_cache_length_follows_the_positions_and_answers_do_not_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """The KV cache starts at INITIAL_LEN positions, doubles as rows advance (moving what they
    wrote), halves once three quarters stand unused: the same tokens and logits as a cache that
    holds every position from the start."""
    model = tiny_model(seed=51)
    stms = model.init_stm(2, torch.Generator().manual_seed(4), std=1.0)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]

    def run(initial: int) -> tuple[list[list[int]], list[torch.Tensor], list[int]]:
        monkeypatch.setattr(DecodeBatch, "INITIAL_LEN", initial)
        batch = DecodeBatch(model, capacity=2, max_len=64)
        batch.join([JoinRequest(i, p, stms[i], GREEDY, 0) for i, p in enumerate(prompts)])
        tokens: list[list[int]] = [[], []]
        logits: list[torch.Tensor] = []
        lengths = [batch.cache.max_len]
        real = model.decode_step

        def watched(*args: object) -> torch.Tensor:
            out = real(*args)  # type: ignore[arg-type]
            logits.append(out.clone())
            return out

        model.decode_step = watched  # type: ignore[method-assign,assignment]
        try:
            for _ in range(20):
                for row, t in enumerate(batch.step().tolist()):
                    tokens[int(batch.keys[row])].append(t)  # type: ignore[call-overload]
                lengths.append(batch.cache.max_len)
        finally:
            del model.decode_step
        batch.leave(0)
        batch.leave(1)
        lengths.append(batch.cache.max_len)
        return tokens, logits, lengths

    want, want_logits, full = run(64)
    got, got_logits, grown = run(4)
    assert full == [64] * 22
    assert grown[0] == 8 and grown[-2] == 32 and sorted(set(grown[:-1])) == [8, 16, 32]  # 5 + 1 + 20 positions
    assert grown[-1] < 32  # everyone left: shrunk again
    assert got == want
    for a, b in zip(want_logits, got_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
