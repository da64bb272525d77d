"""Incremental decoding and batching give the same numbers as the plain forward pass."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from rxruntime.models import DecodeBatch, JoinRequest, RxTModel, SamplingParams, generate

from .conftest import tiny_model


def test_kv_cache_decoding_matches_full_forward(model: RxTModel) -> None:
    stm = model.init_stm(3, torch.Generator().manual_seed(0), std=1.0)
    ids = torch.randint(7, 97, (3, 25))
    with torch.no_grad():
        full = model.decoder_logits(ids, stm)
        cache = model.new_cache(3)
        memory_kv = model.memory_kv(stm)
        logits = model.prefill(ids[:, :7], torch.full((3,), 7), memory_kv, cache)
        torch.testing.assert_close(logits, full[:, 6], rtol=1e-4, atol=1e-5)
        for t in range(7, 25):
            logits = model.decode_step(ids[:, t], torch.full((3,), t), memory_kv, cache)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-5)


def test_rows_at_different_positions_decode_independently(model: RxTModel) -> None:
    """Right-padded prompts of different lengths: every row matches its own full forward."""
    stm = model.init_stm(3, torch.Generator().manual_seed(1), std=1.0)
    lengths = [4, 9, 6]
    seqs = [torch.randint(7, 97, (n + 5,)) for n in lengths]
    padded = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        padded[i, :n] = seqs[i][:n]
    with torch.no_grad():
        cache = model.new_cache(3)
        memory_kv = model.memory_kv(stm)
        got = [model.prefill(padded, torch.tensor(lengths), memory_kv, cache)]
        for step in range(5):
            tokens = torch.stack([s[n + step] for s, n in zip(seqs, lengths)])
            positions = torch.tensor([n + step for n in lengths])
            got.append(model.decode_step(tokens, positions, memory_kv, cache))
        for i, n in enumerate(lengths):
            ref = model.decoder_logits(seqs[i][None], stm[i : i + 1])[0]
            for step in range(6):
                torch.testing.assert_close(got[step][i], ref[n - 1 + step], rtol=1e-4, atol=1e-5)


def test_batch_of_conversations_equals_each_alone() -> None:
    model = tiny_model(seed=2)
    stm = model.init_stm(4, torch.Generator().manual_seed(2), std=1.0)
    prompts = [torch.randint(7, 97, (n,)).tolist() for n in (3, 8, 5, 12)]
    greedy = SamplingParams(temperature=0.0)
    batched = generate(model, stm, prompts, greedy, max_new_tokens=12)
    alone = [generate(model, stm[i : i + 1], [p], greedy, max_new_tokens=12)[0] for i, p in enumerate(prompts)]
    assert batched == alone
    assert all(len(a) > 0 for a in alone)
    # and the STM matters: another memory gives other answers
    other = generate(
        model, model.init_stm(4, torch.Generator().manual_seed(9), std=1.0), prompts, greedy, max_new_tokens=12
    )
    assert other != batched
    # the memory update is batched the same way
    ids = torch.randint(7, 97, (4, 10))
    with torch.no_grad():
        together = model.memory_update(stm, ids)
        separate = torch.cat([model.memory_update(stm[i : i + 1], ids[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-5)


def test_sampled_batch_equals_each_alone_with_same_seeds() -> None:
    model = tiny_model(seed=3)
    stm = model.init_stm(3, torch.Generator().manual_seed(3), std=1.0)
    prompts = [torch.randint(7, 97, (n,)).tolist() for n in (4, 6, 5)]
    params = [
        SamplingParams(temperature=1.3, top_k=20, seed=11),
        SamplingParams(temperature=0.8, seed=12),
        SamplingParams(temperature=1.0, top_p=0.7, seed=13),
    ]
    batched = generate(model, stm, prompts, params, max_new_tokens=10)
    alone = [generate(model, stm[i : i + 1], [p], [params[i]], max_new_tokens=10)[0] for i, p in enumerate(prompts)]
    assert batched == alone


def test_rows_join_and_leave_between_steps() -> None:
    """Continuous batching: a conversation's tokens do not depend on who else is in the batch."""
    model = tiny_model(seed=4)
    stm = model.init_stm(3, torch.Generator().manual_seed(4), std=1.0)
    prompts = [torch.randint(7, 97, (n,)).tolist() for n in (5, 7, 4)]
    greedy = SamplingParams(temperature=0.0)
    alone = [generate(model, stm[i : i + 1], [p], greedy, max_new_tokens=30)[0][:8] for i, p in enumerate(prompts)]

    batch = DecodeBatch(model, capacity=3)
    seen: dict[Hashable, list[int]] = {"a": [], "b": [], "c": []}
    first = batch.join([JoinRequest("a", prompts[0], stm[0], greedy, 0)])
    seen["a"].append(int(first[0]))
    for step in range(7):
        if step == 2:  # b joins mid-stream
            seen["b"].append(int(batch.join([JoinRequest("b", prompts[1], stm[1], greedy, 0)])[0]))
        if step == 4:  # c joins, then a leaves early: c moves into a's row
            seen["c"].append(int(batch.join([JoinRequest("c", prompts[2], stm[2], greedy, 0)])[0]))
        if step == 5:
            batch.leave("a")
        tokens = batch.step()
        for key in batch.keys:
            seen[key].append(int(tokens[batch.row_of(key)]))
    assert seen["a"] == alone[0][: len(seen["a"])] and len(seen["a"]) == 6
    assert seen["b"] == alone[1][: len(seen["b"])] and len(seen["b"]) == 6
    assert seen["c"] == alone[2][: len(seen["c"])] and len(seen["c"]) == 4


def test_generation_stops_at_interaction_limit() -> None:
    model = tiny_model(seed=5)
    stm = model.init_stm(1)
    prompt = torch.randint(7, 97, (30,)).tolist()
    out = generate(model, stm, [prompt], SamplingParams(temperature=0.0))
    # 40-token interactions: prompt 30 + answer + [EOS] must fit
    assert len(out[0]) <= 40 - 30 - 1
