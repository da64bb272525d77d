"""Attention with SQA head counts and the RoPE rules, against a plain-math reference."""

from __future__ import annotations

import math

import pytest
import torch

from rxruntime.models.attention import Attention, sdpa
from rxruntime.models.rope import RotaryEmbedding


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (4, 1), (2, 2)])
@pytest.mark.parametrize("t", [1, 7])
def test_sdpa_with_fewer_kv_heads_matches_plain_math(hq: int, hkv: int, t: int) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, hq, t, 8), torch.randn(2, hkv, 11, 8), torch.randn(2, hkv, 11, 8)
    mask = torch.rand(2, 1, 1, 11) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(sdpa(q, k, v, mask=mask), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_sqa_shapes() -> None:
    attn = Attention(dim=64, num_heads=8, q_heads=4, kv_heads=2, rope_mode="none")
    assert attn.q_proj.out_features == 4 * 8
    assert attn.k_proj.out_features == attn.v_proj.out_features == 2 * 8
    assert attn.o_proj.in_features == 4 * 8  # SQA: output projection reads q_heads * head_dim
    out = attn(torch.randn(3, 5, 64), torch.randn(3, 9, 64))
    assert out.shape == (3, 5, 64)
    mha = Attention(dim=64, num_heads=8, q_heads=8, kv_heads=8, rope_mode="none")
    assert sum(p.numel() for p in attn.parameters()) < sum(p.numel() for p in mha.parameters())


def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(1)
    rope = RotaryEmbedding(16, 64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i: int, j: int) -> float:
        return float((rope.rotate(q, torch.tensor([i])) * rope.rotate(k, torch.tensor([j]))).sum())

    assert score(3, 1) == pytest.approx(score(20, 18), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    # rotation keeps the norm
    rotated = rope.rotate(q, torch.tensor([37]))
    assert float(rotated.norm()) == pytest.approx(float(q.norm()), rel=1e-5)


def test_memory_cross_attention_keys_carry_no_position() -> None:
    """rope_mode 'q': the same memory gives the same keys wherever the query sits."""
    torch.manual_seed(2)
    rope = RotaryEmbedding(8, 32)
    attn = Attention(dim=32, num_heads=4, q_heads=2, kv_heads=2, rope_mode="q")
    memory = torch.randn(1, 6, 32)
    k1, _ = attn.project_kv(memory, rope, torch.arange(6))
    k2, _ = attn.project_kv(memory, rope, torch.arange(6) + 10)
    torch.testing.assert_close(k1, k2)
    q1 = attn.project_q(memory[:, :1], rope, torch.tensor([0]))
    q2 = attn.project_q(memory[:, :1], rope, torch.tensor([5]))
    assert not torch.allclose(q1, q2)
