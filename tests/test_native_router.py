"""The C step's bf16 router (decode_step.c's ``route_bf16``) against torch's (``MoE._route_reduced``,
RxLM's ``router_amp`` under ``torch.autocast``): RxT-Beta's published configuration routes in bf16.

bf16 probabilities have 8 significant bits, so experts tie often, and which of two tied experts
takes the k-th place is decided by torch's top-k (libstdc++'s ``nth_element``, or
``partial_sort`` when k * 64 <= experts), not by the values. Where the logits are exact (inputs
and weights from a small set of values, every sum exact in any order) the C router must pick
torch's experts in torch's order, ties and all; a "first index on ties" rule must not (so the
test can tell). On random weights, the float32 sums add in another order than oneDNN's, and a
logit within a rounding error of a bf16 midpoint may round the other way: the C router is then
torch's on nearly every row, and the bound says how nearly.
"""

from __future__ import annotations

import ctypes
import os
import shutil

import pytest
import torch

from rxruntime.models import native
from rxruntime.models.moe import MoE

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: the C decode step cannot be built"
)


def _c_route(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts) of the C router for tokens x (n, dim)."""
    n, dim = x.shape
    weight = moe.router.weight.detach().to(torch.bfloat16).contiguous()
    experts = torch.empty(n, moe.top_k, dtype=torch.long)
    weights = torch.empty(n, moe.top_k)
    x = x.contiguous()
    native.library().rxt_route_bf16(
        ctypes.c_int(n), ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(dim), ctypes.c_void_p(weight.data_ptr()),
        ctypes.c_int64(moe.num_experts), ctypes.c_int64(moe.top_k), ctypes.c_void_p(experts.data_ptr()),
        ctypes.c_void_p(weights.data_ptr()),
    )  # fmt: skip
    return weights, experts


def _moe(experts: int, top_k: int, dim: int) -> MoE:
    return MoE(dim, 8, experts, top_k, router_dtype="bfloat16")


# (experts, top_k): nth_element (k * 64 > experts: RxT-Beta's 384 top-10, the fixtures' sizes)
# and partial_sort (k * 64 <= experts).
SHAPES = [(24, 10), (16, 10), (384, 10), (36, 6), (128, 2), (700, 10)]


@pytest.mark.parametrize(("experts", "top_k"), SHAPES)
def test_exact_logits_give_torchs_experts_ties_included(experts: int, top_k: int) -> None:
    dim = 64
    g = torch.Generator().manual_seed(experts * 100 + top_k)
    moe = _moe(experts, top_k, dim)
    with torch.no_grad():  # weights in {-2..2} / 8 and inputs in {-1, 0, 1}: every sum exact, few distinct logits
        moe.router.weight.copy_(torch.randint(-2, 3, (experts, dim), generator=g).float() / 8)
    x = torch.randint(-1, 2, (400, dim), generator=g).float() * (torch.rand(400, 1, generator=g) < 0.9)
    want_w, want_e = moe.route(x)[:2]
    got_w, got_e = _c_route(moe, x)
    assert torch.equal(got_e, want_e)
    assert torch.equal(got_w, want_w.float())
    # The ties were there and decided the choice: the first-index rule picks other experts.
    probs = torch.softmax(torch.nn.functional.linear(x.bfloat16(), moe.router.weight.bfloat16()), dim=-1).float()
    ordered = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    assert not torch.equal(ordered.sort(-1).values, want_e.sort(-1).values)


@pytest.mark.parametrize(("experts", "top_k"), SHAPES)
def test_random_router_agrees_with_torch_on_nearly_every_row(experts: int, top_k: int) -> None:
    """Measured here: every row equal at these shapes but one (700 experts: 1 of 2,000 rows with
    a weight one bf16 step apart); a nearly uniform router (weights 1e-3) flips 5 of 2,000."""
    dim = 128
    g = torch.Generator().manual_seed(7)
    moe = _moe(experts, top_k, dim)
    with torch.no_grad():
        moe.router.weight.normal_(generator=g).mul_(0.02)
    x = torch.randn(2000, dim, generator=g)
    want_w, want_e = moe.route(x)[:2]
    got_w, got_e = _c_route(moe, x)
    same = (got_e == want_e).all(-1) & (got_w == want_w.float()).all(-1)
    assert int(same.sum()) >= 1990
    assert float((got_w.sum(-1) - 1).abs().max()) < 2e-2  # bf16 weights that sum to about 1


def test_bf16_router_copy_follows_in_place_edits() -> None:
    """The C step keeps a bf16 copy of a bf16 router, also for a float32 model, whose other
    weights it reads in place: an in-place edit of the router reaches the copy."""
    from .test_native_layouts import _beta, _run

    model = _beta(70, router_dtype="bfloat16")
    before = _run(model, True, steps=2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoE):
                module.router.weight.mul_(-1.0)
    after = _run(model, True, steps=2)
    reference = _run(model, False, steps=2)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after[0], reference[0], rtol=1e-4, atol=1e-4)
