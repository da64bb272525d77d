"""Mixture-of-Experts routing and vectorised dispatch."""

from __future__ import annotations

import torch

from rxruntime.models.moe import MoE


def _naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token reference: each token through its top-k experts, one at a time."""
    out = torch.zeros_like(x)
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)
    for n in range(x.shape[0]):
        top = probs[n].topk(moe.top_k)
        weights = top.values / top.values.sum()
        for w, e in zip(weights, top.indices):
            gate, up = (x[n] @ moe.w_in[e].T).chunk(2)
            out[n] += w * ((torch.nn.functional.silu(gate) * up) @ moe.w_out[e].T)
    return out


def test_routing_weights_sum_to_one_with_exactly_k_experts() -> None:
    torch.manual_seed(0)
    moe = MoE(16, 24, num_experts=6, top_k=3)
    weights, experts, probs = moe.route(torch.randn(50, 16))
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    assert experts.shape == (50, 3)
    assert all(len(set(row.tolist())) == 3 for row in experts)  # k distinct experts per token
    assert (weights > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(50))


def test_vectorised_dispatch_equals_naive_per_token_loop() -> None:
    torch.manual_seed(1)
    moe = MoE(16, 24, num_experts=5, top_k=2).eval()
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        got = moe(x)
        ref = _naive(moe, x.reshape(-1, 16)).reshape(2, 13, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_single_token_and_unused_experts() -> None:
    torch.manual_seed(2)
    moe = MoE(8, 12, num_experts=7, top_k=2).eval()
    x = torch.randn(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _naive(moe, x), rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_in_training() -> None:
    torch.manual_seed(3)
    moe = MoE(8, 12, num_experts=4, top_k=1).train()
    moe(torch.randn(64, 8))
    assert moe.aux_loss is not None
    # E * sum f_e P_e is 1 for perfectly uniform routing and grows with imbalance
    assert 0.9 < float(moe.aux_loss.detach()) < 4.0
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 10.0
    moe(torch.randn(64, 8).abs())
    assert moe.aux_loss is not None and float(moe.aux_loss.detach()) > 2.0
