"""The sampler: greedy, filters, exact distribution, reproducibility independent of batching."""

from __future__ import annotations

import math

import pytest
import torch

from rxruntime.models import ConfigError, SamplingParams
from rxruntime.models.sampler import hash32, sample, uniform_noise


def _sample(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, step: int = 0
) -> torch.Tensor:
    b = logits.shape[0]
    return sample(
        logits,
        torch.full((b,), temperature),
        torch.full((b,), top_k, dtype=torch.long),
        torch.full((b,), top_p),
        torch.full((b,), seed, dtype=torch.long),
        torch.full((b,), step, dtype=torch.long),
        filtered=top_k > 0 or top_p < 1.0,
    )


def test_temperature_zero_is_greedy() -> None:
    logits = torch.randn(5, 50)
    assert torch.equal(_sample(logits, temperature=0.0), logits.argmax(-1))


def test_samples_follow_softmax_distribution() -> None:
    """Counter-based Gumbel-max draws match softmax(logits / T): chi-square over 4000 draws."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    temperature = 0.7
    draws = 4000
    rows = logits.expand(draws, -1)
    steps = torch.arange(draws)
    got = sample(
        rows,
        torch.full((draws,), temperature),
        torch.zeros(draws, dtype=torch.long),
        torch.ones(draws),
        torch.full((draws,), 42, dtype=torch.long),
        steps,
        filtered=False,
    )
    counts = torch.bincount(got, minlength=5).double()
    expected = torch.softmax(logits.double() / temperature, -1) * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001


def test_top_k_and_top_p_never_leave_their_sets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(300, 40)
    top5 = logits.topk(5).indices
    got = sample(
        logits,
        torch.full((300,), 2.0),
        torch.full((300,), 5, dtype=torch.long),
        torch.ones(300),
        torch.arange(300),
        torch.zeros(300, dtype=torch.long),
    )
    assert all(int(t) in set(row.tolist()) for t, row in zip(got, top5))
    assert len(set(got.tolist())) > 5  # not collapsed to greedy

    probs = torch.softmax(logits, -1)
    got = sample(
        logits,
        torch.ones(300),
        torch.zeros(300, dtype=torch.long),
        torch.full((300,), 0.5),
        torch.arange(300),
        torch.zeros(300, dtype=torch.long),
    )
    for row, token in zip(probs, got):
        order = row.argsort(descending=True)
        mass_above = row[order].cumsum(0) - row[order]
        nucleus = set(order[mass_above < 0.5].tolist())
        assert int(token) in nucleus


def test_same_seed_same_tokens_regardless_of_batch_neighbours() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    alone = [int(_sample(logits[i : i + 1], temperature=1.0, top_p=0.9, seed=7, step=3)[0]) for i in range(4)]
    batch = _sample(logits, temperature=1.0, top_p=0.9, seed=7, step=3).tolist()
    assert batch == alone
    different_seeds = [int(_sample(logits[:1], seed=s, step=0)[0]) for s in range(40)]
    assert len(set(different_seeds)) > 5


def test_noise_is_uniform_and_distinct() -> None:
    u = uniform_noise(torch.tensor([1, 2**40 + 5]), torch.tensor([0, 9]), torch.arange(20000))
    assert u.shape == (2, 20000)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005
    assert len(torch.unique(u[0])) == 20000
    h = hash32(torch.arange(1000))
    assert int(h.min()) >= 0 and int(h.max()) < 2**32


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),
        dict(top_k=-2),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(temperature=math.nan),
        dict(seed=-1),
    ],
)
def test_invalid_sampling_params_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["rejection", "sorted"])
def test_top_p_applies_to_the_renormalised_top_k_set(path: str) -> None:
    """Probabilities .4 .3 .2 .1 with k=2, p=.5: within the top-2 set token 1 has .571 above it,
    so only token 0 may be drawn (the full-vocabulary nucleus would also allow token 1)."""
    from rxruntime.models import sampler

    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(400, -1)
    args = (
        torch.ones(400, dtype=torch.float64),
        torch.full((400,), 2, dtype=torch.long),
        torch.full((400,), 0.5, dtype=torch.float64),
        torch.arange(400),
        torch.zeros(400, dtype=torch.long),
    )
    scaled = logits.double()
    if path == "rejection":
        got = sampler._sample_filtered_by_rejection(scaled, *args[1:])
    else:
        got = sampler._sample_filtered(scaled, *args[1:])
    assert set(got.tolist()) == {0}
    # k=2 with p=.6: token 1 has .571 < .6 above it, so both of the top-2 are drawn, never 2 or 3.
    wider = (args[1], torch.full((400,), 0.6, dtype=torch.float64), args[3], args[4])
    got = (
        sampler._sample_filtered_by_rejection(scaled, *wider)
        if path == "rejection"
        else sampler._sample_filtered(scaled, *wider)
    )
    assert set(got.tolist()) == {0, 1}


def test_top_k_and_top_p_together_match_the_reference_filter() -> None:
    """Random rows, both filters set: every draw lies in the set Hugging Face's top-k-then-top-p
    keeps (top-k, renormalise, keep tokens whose mass above is below p), on both paths."""
    torch.manual_seed(3)
    logits = torch.randn(200, 30) * 2
    k, p = 6, 0.7
    got = _sample(logits, top_k=k, top_p=p, seed=11)
    for row, token in zip(logits, got):
        top = row.topk(k)
        probs = torch.softmax(top.values, -1)
        mass_above = probs.cumsum(0) - probs
        allowed = set(top.indices[mass_above < p].tolist())
        assert int(token) in allowed
