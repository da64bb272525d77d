"""TensorBLEU against NLTK: same token ids, same numbers, for every smoothing method we support.

NLTK (``nltk.translate.bleu_score``) is the reference: each row of a TensorBLEU batch must equal
``sentence_bleu`` on that row's lists, and ``corpus_bleu`` on the whole batch, to 1e-6.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.translate.bleu_score import SmoothingFunction
from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

from rxruntime.training import tensorbleu as tb
from rxruntime.training.tensorbleu import Smoothing, corpus_bleu, ngram_stats, sentence_bleu

TOL = 1e-6
METHODS = range(8)
WEIGHT_SETS: list[tuple[float, ...]] = [
    (0.25, 0.25, 0.25, 0.25),
    (0.5, 0.5),
    (1 / 3, 1 / 3, 1 / 3),
    (0.1, 0.3, 0.5, 0.1),
    (0.2, 0.2, 0.2, 0.2, 0.2),
    (1.0,),
]
# NLTK signals an unusable input to method6 with AssertionError (zero trigram precision) or
# IndexError (fewer than 3 orders); TensorBLEU raises ValueError for the whole batch instead.
NLTK_REFUSES = (AssertionError, IndexError)


@dataclass
class Batch:
    """A padded batch plus the same data as plain lists, the form NLTK takes."""

    candidates: torch.Tensor  # [B, Lc]
    references: torch.Tensor  # [B, R, Lr]
    candidate_lengths: torch.Tensor  # [B]
    reference_lengths: torch.Tensor  # [B, R]
    reference_mask: torch.Tensor  # [B, R]
    hyps: list[list[int]]
    refs: list[list[list[int]]]  # only the present references


def make_batch(hyps: list[list[int]], refs: list[list[list[int] | None]], filler: int = -7) -> Batch:
    """Pad lists into tensors; ``None`` marks an absent reference slot. Padding holds ``filler``
    (a value no real sequence uses) so a bug that reads past a length shows up as a mismatch."""
    num_refs = max(len(r) for r in refs)
    lc = max([len(h) for h in hyps], default=0)
    lr = max([len(x) for r in refs for x in r if x is not None], default=0)
    batch = len(hyps)
    cand = torch.full((batch, lc), filler, dtype=torch.long)
    ref = torch.full((batch, num_refs, lr), filler, dtype=torch.long)
    cand_len = torch.zeros(batch, dtype=torch.long)
    ref_len = torch.zeros(batch, num_refs, dtype=torch.long)
    mask = torch.zeros(batch, num_refs, dtype=torch.bool)
    for b, h in enumerate(hyps):
        cand[b, : len(h)] = torch.tensor(h, dtype=torch.long)
        cand_len[b] = len(h)
        for r, x in enumerate(refs[b]):
            if x is None:
                continue
            ref[b, r, : len(x)] = torch.tensor(x, dtype=torch.long)
            ref_len[b, r] = len(x)
            mask[b, r] = True
    present = [[x for x in r if x is not None] for r in refs]
    return Batch(cand, ref, cand_len, ref_len, mask, hyps, present)


@st.composite
def batches(draw: st.DrawFn, max_batch: int = 6, max_len: int = 14) -> Batch:
    """Random batches: 1-4 reference slots (some absent), small vocabularies so n-grams repeat."""
    vocab = draw(st.integers(1, 40))
    token = st.integers(0, vocab - 1)
    size = draw(st.integers(1, max_batch))
    slots = draw(st.integers(1, 4))
    seq = st.lists(token, max_size=max_len)
    hyps = [draw(seq) for _ in range(size)]
    refs: list[list[list[int] | None]] = []
    for h in hyps:
        row: list[list[int] | None] = []
        for slot in range(slots):
            absent = slot > 0 and draw(st.booleans())
            # A reference is often a lightly edited copy of the candidate, so that high-order
            # matches, clipping and brevity are all exercised, not only near-zero scores.
            copy = draw(st.booleans())
            ref = None if absent else (_edit(h, draw(st.lists(token, max_size=4)), draw) if copy else draw(seq))
            row.append(ref)
        refs.append(row)
    return make_batch(hyps, refs)


def _edit(h: list[int], insert: list[int], draw: st.DrawFn) -> list[int]:
    at = draw(st.integers(0, len(h)))
    cut = draw(st.integers(0, 2))
    return h[:at] + insert + h[at + cut :]


def nltk_sentences(batch: Batch, weights: Sequence[float], method: int, auto_reweigh: bool = False) -> list[float]:
    fn = getattr(SmoothingFunction(), f"method{method}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # method0 warns about every zero precision
        return [
            float(nltk_sentence_bleu(r, h, tuple(weights), fn, auto_reweigh)) for h, r in zip(batch.hyps, batch.refs)
        ]


def nltk_corpus(batch: Batch, weights: Sequence[float], method: int, auto_reweigh: bool = False) -> float:
    fn = getattr(SmoothingFunction(), f"method{method}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(nltk_corpus_bleu(batch.refs, batch.hyps, tuple(weights), fn, auto_reweigh))


def ours(
    fn: Callable[..., torch.Tensor], batch: Batch, weights: Sequence[float], method: int, **kw: Any
) -> torch.Tensor:
    return fn(
        batch.candidates,
        batch.references,
        candidate_lengths=batch.candidate_lengths,
        reference_lengths=batch.reference_lengths,
        reference_mask=batch.reference_mask,
        weights=weights,
        smoothing=method,
        **kw,
    )


def assert_close(got: Sequence[float], want: Sequence[float]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= TOL, f"row {i}: tensorbleu {g!r} != nltk {w!r}"


# ---------------------------------------------------------------------------------------------
# Agreement with NLTK on random batches


@settings(max_examples=200, deadline=None)
@given(
    batch=batches(),
    weights=st.sampled_from(WEIGHT_SETS),
    method=st.sampled_from(METHODS),
    auto_reweigh=st.booleans(),
)
def test_sentence_bleu_matches_nltk(batch: Batch, weights: tuple[float, ...], method: int, auto_reweigh: bool) -> None:
    try:
        want = nltk_sentences(batch, weights, method, auto_reweigh)
    except NLTK_REFUSES:
        with pytest.raises(ValueError):
            ours(sentence_bleu, batch, weights, method, auto_reweigh=auto_reweigh)
        return
    got = ours(sentence_bleu, batch, weights, method, auto_reweigh=auto_reweigh)
    assert got.dtype == torch.float64 and got.shape == (len(batch.hyps),)
    assert_close(got.tolist(), want)


@settings(max_examples=120, deadline=None)
@given(
    batch=batches(),
    weights=st.sampled_from(WEIGHT_SETS),
    method=st.sampled_from(METHODS),
    auto_reweigh=st.booleans(),
)
def test_corpus_bleu_matches_nltk(batch: Batch, weights: tuple[float, ...], method: int, auto_reweigh: bool) -> None:
    try:
        want = nltk_corpus(batch, weights, method, auto_reweigh)
    except NLTK_REFUSES:
        with pytest.raises(ValueError):
            ours(corpus_bleu, batch, weights, method, auto_reweigh=auto_reweigh)
        return
    got = ours(corpus_bleu, batch, weights, method, auto_reweigh=auto_reweigh)
    assert got.shape == ()
    assert_close([got.item()], [want])


@settings(max_examples=60, deadline=None)
@given(batch=batches(), max_order=st.integers(1, 6))
def test_row_and_chained_dictionaries_count_the_same(batch: Batch, max_order: int) -> None:
    """The default chained dictionary (1-D unique per order) and the ``unique(dim=0)`` one agree."""
    kw: dict[str, Any] = dict(
        candidate_lengths=batch.candidate_lengths,
        reference_lengths=batch.reference_lengths,
        reference_mask=batch.reference_mask,
        max_order=max_order,
    )
    chained = tb._ngram_stats(batch.candidates, batch.references, rows_dictionary=False, **kw)
    rows = tb._ngram_stats(batch.candidates, batch.references, rows_dictionary=True, **kw)
    assert torch.equal(chained.matches, rows.matches)


@settings(max_examples=30, deadline=None)
@given(batch=batches(), method=st.sampled_from([0, 1, 3]))
def test_pad_id_is_the_same_as_lengths(batch: Batch, method: int) -> None:
    pad = -1  # never a token id in these batches
    cand = batch.candidates.masked_fill(
        torch.arange(batch.candidates.shape[1]) >= batch.candidate_lengths[:, None], pad
    )
    positions = torch.arange(batch.references.shape[2])
    refs = batch.references.masked_fill(positions >= batch.reference_lengths[..., None], pad)
    by_pad = sentence_bleu(cand, refs, pad_id=pad, reference_mask=batch.reference_mask, smoothing=method)
    assert torch.equal(by_pad, ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, method))


# ---------------------------------------------------------------------------------------------
# Fixed cases


def test_identical_sentences_score_one() -> None:
    h = [5, 3, 9, 9, 2, 7, 1]
    batch = make_batch([h, h[:4]], [[h], [h[:4], [1, 2]]])
    for method in METHODS:
        got = ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, method).tolist()
        if method in (5, 7):
            # NLTK's method5 averages p_1 with a "p_0" of p_1 + 1, so a perfect match scores
            # above 1; we reproduce that rather than clamp it.
            assert min(got) > 1.0
            assert_close(got, nltk_sentences(batch, tb.DEFAULT_WEIGHTS, method))
        else:
            assert got == pytest.approx([1.0, 1.0], abs=1e-12)


def test_no_overlap_scores_zero_with_or_without_smoothing() -> None:
    batch = make_batch([[1, 2, 3, 4, 5], [6, 6, 6]], [[[7, 8, 9, 10, 11]], [[1, 2], [3, 4, 5, 7]]])
    for method in METHODS:
        got = ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, method)
        assert got.tolist() == [0.0, 0.0]  # NLTK returns exactly 0 when no unigram matches
        assert got.tolist() == nltk_sentences(batch, tb.DEFAULT_WEIGHTS, method)


def test_empty_candidate_scores_zero() -> None:
    batch = make_batch([[], [1, 2, 3, 4]], [[[1, 2, 3]], [[]]])
    for method in METHODS:
        assert ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, method).tolist() == [0.0, 0.0]
    # zero-width tensors: nothing to count at all
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert sentence_bleu(empty, empty[:, None, :]).tolist() == [0.0, 0.0]
    assert corpus_bleu(empty, empty).item() == 0.0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_candidates_shorter_than_the_order(method: int, length: int) -> None:
    """Orders above the candidate length have no n-grams: NLTK gives them precision 0/1."""
    ref = [4, 1, 2, 3, 4, 1, 2]
    hyps = [[1, 2, 3, 4][:length], [4] * length, [9] * (length - 1) + [2]]
    batch = make_batch(hyps, [[ref], [ref, ref[:2]], [ref[:3]]])
    for auto_reweigh in (False, True):
        try:
            want = nltk_sentences(batch, tb.DEFAULT_WEIGHTS, method, auto_reweigh)
        except NLTK_REFUSES:
            with pytest.raises(ValueError):
                ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, method, auto_reweigh=auto_reweigh)
            continue
        assert_close(ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, method, auto_reweigh=auto_reweigh).tolist(), want)


def test_no_smoothing_with_a_missing_order_is_nltks_tiny_value() -> None:
    """NLTK's method0 substitutes sys.float_info.min for a zero precision (no exact 0)."""
    batch = make_batch([[1, 2, 3, 9, 8, 7]], [[[1, 2, 3, 4, 5, 6]]])
    got = sentence_bleu(batch.candidates, batch.references)
    want = nltk_sentences(batch, tb.DEFAULT_WEIGHTS, 0)
    assert 0.0 < want[0] < 1e-50
    assert got.item() == pytest.approx(want[0], rel=1e-9)


def test_brevity_penalty_uses_closest_reference_shorter_on_tie() -> None:
    hyp = list(range(12))
    refs: list[list[int] | None] = [list(range(13)), list(range(11))]  # both 1 away: 11 is used
    batch = make_batch([hyp, hyp[:7]], [refs, [list(range(11)), list(range(8))]])
    stats = ngram_stats(
        batch.candidates,
        batch.references,
        candidate_lengths=batch.candidate_lengths,
        reference_lengths=batch.reference_lengths,
    )
    assert stats.ref_lengths.tolist() == [11, 8]
    assert_close(
        ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, 0).tolist(), nltk_sentences(batch, tb.DEFAULT_WEIGHTS, 0)
    )


def test_clipping_caps_repeated_ngrams_at_the_reference_maximum() -> None:
    # The "the the the ..." example: 7 candidate unigrams, at most 2 in any one reference.
    the, cat, is_, on, mat, there, a = range(7)
    refs: list[list[int] | None] = [[the, cat, is_, on, the, mat], [there, is_, a, cat, on, the, mat]]
    batch = make_batch([[the] * 7], [refs])
    stats = ngram_stats(batch.candidates, batch.references, reference_lengths=batch.reference_lengths)
    assert stats.matches[0].tolist() == [2, 0, 0, 0]
    assert stats.totals[0].tolist() == [7, 6, 5, 4]


NLTK_DOC = {
    "hyp": "It is a guide to action which ensures that the military always obeys the commands of the party",
    "ref1": "It is a guide to action that ensures that the military will forever heed Party commands",
    "ref2": "It is the guiding principle which guarantees the military forces always being under the command of "
    "the Party",
    "ref3": "It is the practical guide for the army always to heed the directions of the party",
}


def test_nltk_docstring_example_as_token_ids() -> None:
    vocab: dict[str, int] = {}
    ids = {k: [vocab.setdefault(w, len(vocab)) for w in v.split()] for k, v in NLTK_DOC.items()}
    refs: list[list[int] | None] = [ids["ref1"], ids["ref2"], ids["ref3"]]
    batch = make_batch([ids["hyp"], ids["hyp"]], [refs, [ids["ref1"], None, None]])
    got = ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, 0).tolist()
    assert got[0] == pytest.approx(0.5045666840058485, abs=1e-12)  # NLTK docstring: 0.5045...
    for method in METHODS:
        want = nltk_sentences(batch, tb.DEFAULT_WEIGHTS, method)
        assert_close(ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, method).tolist(), want)


def test_smoothing_parameters_are_passed_through() -> None:
    batch = make_batch([[1, 2, 3, 5, 6, 7, 8]], [[[1, 2, 3, 4, 5, 6, 7, 9]]])
    for method, params in [(1, dict(epsilon=0.3)), (4, dict(k=2.0)), (6, dict(alpha=2.0)), (7, dict(k=3.0))]:
        fn = getattr(SmoothingFunction(**params), f"method{method}")
        want = nltk_sentence_bleu(batch.refs[0], batch.hyps[0], smoothing_function=fn)
        got = sentence_bleu(batch.candidates, batch.references, smoothing=Smoothing(method=method, **params))
        assert got.item() == pytest.approx(want, abs=TOL)


def test_single_reference_2d_and_int32_inputs() -> None:
    cand = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 0]], dtype=torch.int32)
    ref = torch.tensor([[3, 1, 4, 1, 5, 9, 2], [2, 6, 5, 3, 5, 8, 9]], dtype=torch.int32)
    got = sentence_bleu(cand, ref, reference_lengths=torch.tensor([7, 5]), smoothing=1)
    batch = make_batch([c.tolist() for c in cand], [[ref[0].tolist()], [ref[1, :5].tolist()]])
    assert_close(got.tolist(), nltk_sentences(batch, tb.DEFAULT_WEIGHTS, 1))


def test_method6_refuses_what_nltk_refuses() -> None:
    batch = make_batch([[1, 2, 9, 3, 4]], [[[1, 2, 3, 4, 5]]])  # bigram match, no trigram match
    with pytest.raises(AssertionError):
        nltk_sentences(batch, tb.DEFAULT_WEIGHTS, 6)
    with pytest.raises(ValueError, match="trigram"):
        sentence_bleu(batch.candidates, batch.references, smoothing=6)


def test_empty_batch() -> None:
    cand = torch.zeros(0, 5, dtype=torch.long)
    refs = torch.zeros(0, 2, 5, dtype=torch.long)
    assert sentence_bleu(cand, refs).shape == (0,)
    assert corpus_bleu(cand, refs).item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(candidate_lengths=torch.tensor([9])), "candidate lengths"),
        (dict(reference_lengths=torch.tensor([[-1]])), "reference lengths"),
        (dict(reference_mask=torch.tensor([[False]])), "at least one reference"),
        (dict(weights=()), "weights"),
        (dict(smoothing=8), "smoothing"),
    ],
)
def test_bad_inputs_are_named(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sentence_bleu(torch.tensor([[1, 2, 3]]), torch.tensor([[[1, 2, 3]]]), **kwargs)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="candidates"):
        sentence_bleu(torch.tensor([1, 2, 3]), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="references for"):
        sentence_bleu(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3], [1, 2, 3]]))
    with pytest.raises(ValueError, match="integer"):
        sentence_bleu(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 2]]))


# ---------------------------------------------------------------------------------------------
# Vectorisation: one call for the batch, no per-sentence work


def _random_batch(size: int, seed: int, max_len: int = 24, vocab: int = 30) -> Batch:
    g = torch.Generator().manual_seed(seed)
    hyps: list[list[int]] = []
    refs: list[list[list[int] | None]] = []
    for _ in range(size):
        h = torch.randint(0, vocab, (int(torch.randint(0, max_len + 1, (1,), generator=g)),), generator=g).tolist()
        hyps.append(h)
        row: list[list[int] | None] = []
        for slot in range(int(torch.randint(1, 4, (1,), generator=g))):
            r = list(h)
            for _ in range(int(torch.randint(0, 4, (1,), generator=g))):  # a few substitutions
                if r:
                    r[int(torch.randint(0, len(r), (1,), generator=g))] = int(
                        torch.randint(0, vocab, (1,), generator=g)
                    )
            row.append(r[: len(r) - slot])
        refs.append(row)
    return make_batch(hyps, refs)


def test_batch_equals_one_sentence_at_a_time() -> None:
    batch = _random_batch(64, seed=1)
    for method in (0, 1, 2, 3, 4, 5, 7):
        whole = ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, method)
        for b in range(len(batch.hyps)):
            single = sentence_bleu(
                batch.candidates[b : b + 1],
                batch.references[b : b + 1],
                candidate_lengths=batch.candidate_lengths[b : b + 1],
                reference_lengths=batch.reference_lengths[b : b + 1],
                reference_mask=batch.reference_mask[b : b + 1],
                smoothing=method,
            )
            assert single.item() == whole[b].item(), (method, b)


def test_batch_of_512_is_one_call_with_a_fixed_number_of_uniques(monkeypatch: pytest.MonkeyPatch) -> None:
    """The number of torch.unique calls is one per n-gram order whatever the batch size, so
    there is no hidden loop over sentences; the 512 scores still match NLTK row by row."""
    calls: list[int] = []
    real_unique = torch.unique

    def counting_unique(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_unique(*args, **kwargs)

    monkeypatch.setattr(torch, "unique", counting_unique)
    small = make_batch([[1, 2, 3, 4, 5]], [[[1, 2, 3, 4, 6]]])
    large = _random_batch(512, seed=2)
    ours(sentence_bleu, small, tb.DEFAULT_WEIGHTS, 1)
    calls_small = len(calls)
    calls.clear()
    got = ours(sentence_bleu, large, tb.DEFAULT_WEIGHTS, 1)
    assert len(calls) == calls_small == 4
    assert_close(got.tolist(), nltk_sentences(large, tb.DEFAULT_WEIGHTS, 1))


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    batch = _random_batch(128, seed=4)
    for method in METHODS:
        if method == 6:
            continue  # refuses most random batches (needs trigram matches everywhere)
        cpu = ours(sentence_bleu, batch, tb.DEFAULT_WEIGHTS, method)
        gpu = sentence_bleu(
            batch.candidates.cuda(),
            batch.references.cuda(),
            candidate_lengths=batch.candidate_lengths.cuda(),
            reference_lengths=batch.reference_lengths.cuda(),
            reference_mask=batch.reference_mask.cuda(),
            smoothing=method,
        )
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-12)
