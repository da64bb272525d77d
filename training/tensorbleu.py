"""TensorBLEU: per-sentence token-ID BLEU for whole batches, computed in torch where the ids live.

Reinforcement-learning stages (MRL) need one BLEU reward per generated sample in every batch.
Moving the ids to the CPU and looping NLTK over sentences would stall training, so this module
computes the same numbers as ``nltk.translate.bleu_score.sentence_bleu`` (and ``corpus_bleu``)
with a fixed number of tensor operations per n-gram order, whatever the batch size.

The scores are "token-ID BLEU": n-grams are compared by token id, so they depend on the
tokenizer. Use them for rewards and relative tracking, not as publishable text BLEU.

How n-grams are counted (see docs/tensorbleu.md)::

    for each order n:
        ids   = torch.unique(n-grams of every candidate and reference, tagged with their sentence,
                             return_inverse=True)        # compact, batch-specific dictionary
        count = bincount(owner * U + ids)                # owner 0: candidate, 1+r: reference r
        clip  = min(count[candidate], max_r count[reference r])
        numerator[sentence] += clip

The dictionary holds only the (sentence, n-gram) pairs that occur, so memory grows with the
number of n-grams in the batch, never with ``vocab_size ** n`` nor with ``batch * unique``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rxruntime.models.errors import ConfigError

__all__ = [
    "DEFAULT_WEIGHTS",
    "BleuStats",
    "Smoothing",
    "corpus_bleu",
    "ngram_stats",
    "sentence_bleu",
]

DEFAULT_WEIGHTS: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
# NLTK's method5 always averages with the 5-gram precision, whatever the number of weights.
_METHOD5_ORDER = 5
# Keys of the chained dictionary must stay below this (int64, with headroom).
_KEY_LIMIT = 2**62


@dataclass(frozen=True)
class Smoothing:
    """Which of Chen & Cherry's smoothing methods to apply, exactly as NLTK's ``SmoothingFunction``.

    ``method`` is the NLTK method number: 0 none, 1 add ``epsilon`` to zero matches, 2 add one to
    numerator and denominator of orders >= 2, 3 NIST geometric decay, 4 decay scaled by
    ``k / ln(len)``, 5 average of neighbouring orders, 6 interpolation with a prior (weight
    ``alpha``), 7 method 4 then method 5. The defaults are NLTK's.
    """

    method: int = 0
    epsilon: float = 0.1
    alpha: float = 5.0
    k: float = 5.0

    def __post_init__(self) -> None:
        if self.method not in range(8):
            raise ConfigError(f"smoothing method must be 0..7 (NLTK's method0..method7), got {self.method}")
        if self.method in (4, 7) and self.k == 0:
            raise ConfigError("smoothing k must be non-zero for methods 4 and 7")
        if self.method == 6 and self.alpha < 0:
            raise ConfigError(f"smoothing alpha must be >= 0, got {self.alpha}")


@dataclass(frozen=True)
class BleuStats:
    """Sufficient statistics of BLEU for each candidate, the inputs of every variant of the score.

    ``matches[b, n-1]`` is the clipped count of candidate ``b``'s n-grams (each capped by its
    largest count in any one reference), ``totals[b, n-1]`` the number of n-grams in the candidate
    (0 when it is shorter than ``n``), ``hyp_lengths[b]`` its length and ``ref_lengths[b]`` the
    length of the reference closest to it (ties go to the shorter one). All int64, on the
    device of the inputs.
    """

    matches: Tensor
    totals: Tensor
    hyp_lengths: Tensor
    ref_lengths: Tensor

    @property
    def max_order(self) -> int:
        """Highest n-gram order counted."""
        return int(self.matches.shape[1])


def _as_smoothing(smoothing: Smoothing | int) -> Smoothing:
    return smoothing if isinstance(smoothing, Smoothing) else Smoothing(method=smoothing)


def _check_weights(weights: Sequence[float]) -> tuple[float, ...]:
    w = tuple(float(x) for x in weights)
    if not w:
        raise ConfigError("weights must name at least one n-gram order")
    if not all(math.isfinite(x) for x in w):
        raise ConfigError(f"weights must be finite, got {w}")
    return w


def _lengths(tokens: Tensor, lengths: Tensor | None, pad_id: int | None, name: str) -> Tensor:
    """Lengths of the sequences in ``tokens`` (last dimension): given, up to the first pad, or full."""
    if lengths is not None:
        if lengths.shape != tokens.shape[:-1]:
            raise ValueError(f"{name} must have shape {tuple(tokens.shape[:-1])}, got {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex:
            raise ValueError(f"{name} must be an integer tensor, got {lengths.dtype}")
        return lengths.to(device=tokens.device, dtype=torch.long)
    if pad_id is not None:
        return (tokens != pad_id).long().cumprod(dim=-1).sum(dim=-1)
    return torch.full(tokens.shape[:-1], tokens.shape[-1], dtype=torch.long, device=tokens.device)


def _prepare(
    candidates: Tensor,
    references: Tensor,
    candidate_lengths: Tensor | None,
    reference_lengths: Tensor | None,
    reference_mask: Tensor | None,
    pad_id: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Validate the inputs and bring them to (cand [B,Lc], refs [B,R,Lr], cand_len, ref_len, present)."""
    if candidates.dim() != 2:
        raise ValueError(f"candidates must be (batch, length), got shape {tuple(candidates.shape)}")
    for name, t in (("candidates", candidates), ("references", references)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids, got {t.dtype}")
    if references.device != candidates.device:
        raise ValueError(f"references are on {references.device} but candidates on {candidates.device}")
    if references.dim() == 2:
        references = references.unsqueeze(1)
        if reference_lengths is not None and reference_lengths.dim() == 1:
            reference_lengths = reference_lengths.unsqueeze(1)
        if reference_mask is not None and reference_mask.dim() == 1:
            reference_mask = reference_mask.unsqueeze(1)
    if references.dim() != 3:
        raise ValueError(f"references must be (batch, length) or (batch, refs, length), got {tuple(references.shape)}")
    batch = candidates.shape[0]
    if references.shape[0] != batch:
        raise ValueError(f"{batch} candidates but references for {references.shape[0]}")
    if references.shape[1] == 0:
        raise ValueError("every candidate needs at least one reference (references has 0 slots)")
    cand = candidates.long()
    refs = references.long()
    cand_len = _lengths(cand, candidate_lengths, pad_id, "candidate_lengths")
    ref_len = _lengths(refs, reference_lengths, pad_id, "reference_lengths")
    if reference_mask is None:
        present = torch.ones(refs.shape[:2], dtype=torch.bool, device=refs.device)
    else:
        if reference_mask.shape != refs.shape[:2] or reference_mask.dtype != torch.bool:
            raise ValueError(f"reference_mask must be a bool tensor of shape {tuple(refs.shape[:2])}")
        present = reference_mask.to(refs.device)
    # One host round-trip for all three checks.
    bad = torch.stack(
        [
            ((cand_len < 0) | (cand_len > cand.shape[1])).any(),
            ((ref_len < 0) | (ref_len > refs.shape[2])).any(),
            ~present.any(dim=1).all() if batch else torch.zeros((), dtype=torch.bool, device=cand.device),
        ]
    ).tolist()
    if bad[0]:
        raise ValueError(f"candidate lengths must lie in [0, {cand.shape[1]}]")
    if bad[1]:
        raise ValueError(f"reference lengths must lie in [0, {refs.shape[2]}]")
    if bad[2]:
        raise ValueError("every candidate needs at least one reference (a reference_mask row is all False)")
    ref_len = torch.where(present, ref_len, torch.zeros_like(ref_len))  # absent: contributes no n-grams
    return cand, refs, cand_len, ref_len, present


def _closest_ref_lengths(hyp_len: Tensor, ref_len: Tensor, present: Tensor) -> Tensor:
    """Length of the reference closest to each candidate, the shorter on a tie (NLTK's rule)."""
    far = torch.iinfo(torch.long).max
    diff = torch.where(present, (ref_len - hyp_len[:, None]).abs(), far)
    nearest = diff == diff.amin(dim=1, keepdim=True)
    return torch.where(present & nearest, ref_len, far).amin(dim=1)


def _count_matches(
    cand: Tensor,
    refs: Tensor,
    cand_len: Tensor,
    ref_len: Tensor,
    max_order: int,
    rows_dictionary: bool,
) -> Tensor:
    """Clipped n-gram matches per candidate and order, ``[B, max_order]`` int64.

    All sequences (candidates and references) are stacked into one matrix so that each order
    needs a single ``torch.unique``; the sentence index is part of every key, so an n-gram of
    sentence 3 never meets the same n-gram of sentence 7.

    ``rows_dictionary`` builds the dictionary with ``torch.unique(dim=0)`` over rows
    ``(sentence, t1..tn)``. Otherwise (the default) it is built by chaining: the id of an n-gram is
    the compact id of the pair (id of its (n-1)-gram prefix, last token), packed into one int64,
    so every order is a 1-D ``torch.unique``, a plain sort of int64 keys. On CPU the row-wise
    unique is a comparison sort over rows and made the count ~40x slower (slower than NLTK);
    it remains as the fallback for ids too large to pack. Both give the same counts.
    """
    batch, num_refs = refs.shape[0], refs.shape[1]
    device = cand.device
    matches = torch.zeros(batch, max_order, dtype=torch.long, device=device)
    width = max(cand.shape[1], refs.shape[2])
    if batch == 0 or width == 0:
        return matches
    seqs = torch.cat(
        [
            torch.nn.functional.pad(cand, (0, width - cand.shape[1])),
            torch.nn.functional.pad(refs, (0, width - refs.shape[2])).reshape(batch * num_refs, width),
        ]
    )
    seq_len = torch.cat([cand_len, ref_len.reshape(-1)])
    sentence = torch.arange(batch, device=device)
    seq_sentence = torch.cat([sentence, sentence.repeat_interleave(num_refs)])
    # owner 0 is the candidate, owner 1 + r is reference r of the same sentence.
    seq_owner = torch.cat(
        [
            torch.zeros(batch, dtype=torch.long, device=device),
            torch.arange(1, num_refs + 1, device=device).repeat(batch),
        ]
    )
    shift, span = 0, 1
    if not rows_dictionary:
        # Range of the real token ids (padding excluded), in one host round-trip.
        inside = torch.arange(width, device=device)[None, :] < seq_len[:, None]
        top, bottom = torch.iinfo(torch.long).max, torch.iinfo(torch.long).min
        lo, hi = torch.stack([torch.where(inside, seqs, top).min(), torch.where(inside, seqs, bottom).max()]).tolist()
        if lo <= hi:
            shift, span = lo, hi - lo + 1
        # Keys are below (number of n-grams) * span; beyond int64 fall back to the row-wise unique.
        rows_dictionary = max(seqs.numel(), batch) * span >= _KEY_LIMIT
    flat_seqs = seqs.reshape(-1)
    seq_ids = torch.arange(seqs.shape[0], device=device)
    prefix_id = torch.empty(0, dtype=torch.long, device=device)
    prefix_sentence = torch.empty(0, dtype=torch.long, device=device)

    for n in range(1, max_order + 1):
        # The n-grams inside their sequences: sequence s has max(0, len_s - n + 1), laid out one
        # sequence after another (cheaper than nonzero over a mask; one host sync for the total).
        per_seq = (seq_len - (n - 1)).clamp(min=0)
        total = int(per_seq.sum())
        if total == 0:
            break
        seq = torch.repeat_interleave(seq_ids, per_seq, output_size=total)
        pos = torch.arange(total, device=device) - (torch.cumsum(per_seq, 0) - per_seq)[seq]
        start = seq * width + pos  # flat index of the n-gram's first token
        if rows_dictionary:
            grams = seqs.unfold(1, n, 1)[seq, pos]  # [total, n]
            uniq, inverse = torch.unique(torch.cat([seq_sentence[seq, None], grams], dim=1), dim=0, return_inverse=True)
            uniq_sentence = uniq[:, 0]
        else:
            last = flat_seqs[start + (n - 1)] - shift
            head = seq_sentence[seq] if n == 1 else prefix_id[start]
            uniq, inverse = torch.unique(head * span + last, return_inverse=True)
            uniq_head = torch.div(uniq, span, rounding_mode="floor")
            uniq_sentence = uniq_head if n == 1 else prefix_sentence[uniq_head]
            prefix_id = torch.full_like(flat_seqs, -1)
            prefix_id[start] = inverse
            prefix_sentence = uniq_sentence
        num_ids = uniq.shape[0]
        counts = torch.bincount(seq_owner[seq] * num_ids + inverse, minlength=(num_refs + 1) * num_ids)
        counts = counts.view(num_refs + 1, num_ids)
        best_ref = counts[1] if num_refs == 1 else counts[1:].amax(dim=0)
        clipped = torch.minimum(counts[0], best_ref)
        matches[:, n - 1].index_add_(0, uniq_sentence, clipped)
    return matches


def _ngram_stats(
    candidates: Tensor,
    references: Tensor,
    *,
    candidate_lengths: Tensor | None = None,
    reference_lengths: Tensor | None = None,
    reference_mask: Tensor | None = None,
    pad_id: int | None = None,
    max_order: int = 4,
    rows_dictionary: bool = False,
) -> BleuStats:
    if max_order < 1:
        raise ConfigError(f"max_order must be >= 1, got {max_order}")
    cand, refs, cand_len, ref_len, present = _prepare(
        candidates, references, candidate_lengths, reference_lengths, reference_mask, pad_id
    )
    matches = _count_matches(cand, refs, cand_len, ref_len, max_order, rows_dictionary)
    orders = torch.arange(1, max_order + 1, device=cand.device)
    totals = (cand_len[:, None] - orders[None, :] + 1).clamp(min=0)
    return BleuStats(matches, totals, cand_len, _closest_ref_lengths(cand_len, ref_len, present))


def ngram_stats(
    candidates: Tensor,
    references: Tensor,
    *,
    candidate_lengths: Tensor | None = None,
    reference_lengths: Tensor | None = None,
    reference_mask: Tensor | None = None,
    pad_id: int | None = None,
    max_order: int = 4,
) -> BleuStats:
    """Count clipped n-gram matches for every candidate at once (no loop over sentences).

    This is the expensive half of BLEU, exposed so callers can inspect or log the counts (e.g.
    clipped unigram matches as a cheaper reward). Arguments are those of :func:`sentence_bleu`;
    ``max_order`` is the highest n-gram order counted.
    """
    return _ngram_stats(
        candidates,
        references,
        candidate_lengths=candidate_lengths,
        reference_lengths=reference_lengths,
        reference_mask=reference_mask,
        pad_id=pad_id,
        max_order=max_order,
    )


def _brevity_penalty(ref_len: Tensor, hyp_len: Tensor) -> Tensor:
    """1 if the candidate is longer than its reference, 0 if it is empty, else exp(1 - r/c)."""
    hyp = hyp_len.double()
    ratio = ref_len.double() / hyp.clamp(min=1.0)
    bp = torch.where(hyp_len > ref_len, torch.ones_like(hyp), torch.exp(1.0 - ratio))
    return torch.where(hyp_len == 0, torch.zeros_like(hyp), bp)


def _smoothed_precisions(
    matches: Tensor,
    totals: Tensor,
    hyp_len: Tensor,
    smoothing: Smoothing,
    extra_matches: Tensor,
    extra_totals: Tensor,
    ngram_counts: Tensor,
) -> Tensor:
    """Precision per row and order after smoothing, float64; a 0 means "leave this order out".

    Mirrors each ``SmoothingFunction.methodN`` of NLTK, including its quirks: the denominator of a
    precision is ``max(1, totals)``; method0 uses ``sys.float_info.min`` for a zero precision;
    method4 only smooths candidates longer than one token; method5 looks at the 5-gram precision
    (``extra_*``) after the last order; method6 divides by the raw n-gram count
    (``ngram_counts``) plus alpha.
    """
    num = matches.double()
    den = totals.clamp(min=1).double()
    p = num / den
    zero = matches == 0
    method = smoothing.method
    if method == 0:
        p = torch.where(zero, torch.full_like(p, sys.float_info.min), p)
    elif method == 1:
        p = torch.where(zero, (num + smoothing.epsilon) / den, p)
    elif method == 2:
        p = torch.cat([p[:, :1], (num[:, 1:] + 1.0) / (den[:, 1:] + 1.0)], dim=1)
    elif method == 3:
        k = zero.long().cumsum(dim=1).double()
        p = torch.where(zero, 1.0 / (torch.exp2(k) * den), p)
    if method in (4, 7):
        smooth = zero & (hyp_len > 1)[:, None]
        k = smooth.long().cumsum(dim=1).double()
        log_len = torch.log(hyp_len.clamp(min=2).double())[:, None]
        p = torch.where(smooth, (1.0 / (torch.exp2(k) * smoothing.k / log_len)) / den, p)
    if method in (5, 7):
        following = torch.cat([p[:, 1:], (extra_matches.double() / extra_totals.clamp(min=1).double())[:, None]], dim=1)
        previous = p[:, 0] + 1.0
        out = []
        for i in range(p.shape[1]):
            previous = (previous + p[:, i] + following[:, i]) / 3.0
            out.append(previous)
        p = torch.stack(out, dim=1)
    if method == 6:
        cols = list(p.unbind(dim=1))
        for i in range(2, len(cols)):
            prior = torch.where(cols[i - 2] == 0, torch.zeros_like(cols[i]), cols[i - 1] ** 2 / cols[i - 2])
            cols[i] = (num[:, i] + smoothing.alpha * prior) / (ngram_counts[:, i].double() + smoothing.alpha)
        p = torch.stack(cols, dim=1)
    return p


def _bleu_from_stats(
    matches: Tensor,
    totals: Tensor,
    hyp_len: Tensor,
    ref_len: Tensor,
    weights: tuple[float, ...],
    smoothing: Smoothing,
    auto_reweigh: bool,
    extra_matches: Tensor,
    extra_totals: Tensor,
    ngram_counts: Tensor,
) -> Tensor:
    """BLEU of each row of already-counted statistics (rows are sentences, or one corpus)."""
    order = len(weights)
    if smoothing.method == 6:
        # NLTK reads p_3 and asserts it is non-zero, but only for scores it does not return
        # early as 0 (no unigram match); a batch fails as a whole, since one row would.
        scored = matches[:, 0] > 0
        if order < 3 and bool(scored.any()):
            raise ValueError("smoothing method 6 needs at least 3 n-gram orders (NLTK reads p_3)")
        if order >= 3 and bool((scored & (matches[:, 2] == 0)).any()):
            raise ValueError("smoothing method 6 requires a non-zero trigram precision (as NLTK asserts)")
    p = _smoothed_precisions(matches, totals, hyp_len, smoothing, extra_matches, extra_totals, ngram_counts)
    w = torch.tensor(weights, dtype=torch.float64, device=matches.device).expand(matches.shape[0], order)
    if auto_reweigh and weights == DEFAULT_WEIGHTS:
        # NLTK: a hypothesis shorter than 4 gets uniform weights over the orders it has.
        short = (hyp_len < 4)[:, None]
        uniform = 1.0 / hyp_len.clamp(min=1).double()[:, None]
        has_order = torch.arange(order, device=matches.device)[None, :] < hyp_len[:, None]
        w = torch.where(short, torch.where(has_order, uniform, torch.zeros_like(w)), w)
    keep = p > 0
    log_p = torch.log(torch.where(keep, p, torch.ones_like(p)))
    score = torch.exp(torch.where(keep, w * log_p, torch.zeros_like(p)).sum(dim=1))
    score = _brevity_penalty(ref_len, hyp_len) * score
    return torch.where(matches[:, 0] == 0, torch.zeros_like(score), score)


def _max_order(weights: tuple[float, ...], smoothing: Smoothing) -> int:
    return max(len(weights), _METHOD5_ORDER) if smoothing.method in (5, 7) else len(weights)


def sentence_bleu(
    candidates: Tensor,
    references: Tensor,
    *,
    candidate_lengths: Tensor | None = None,
    reference_lengths: Tensor | None = None,
    reference_mask: Tensor | None = None,
    pad_id: int | None = None,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    smoothing: Smoothing | int = 0,
    auto_reweigh: bool = False,
) -> Tensor:
    """BLEU of every candidate against its own references: ``[B]`` float64, same numbers as NLTK.

    Equals ``nltk.translate.bleu_score.sentence_bleu(refs_b, cand_b, weights,
    SmoothingFunction(...).methodN, auto_reweigh)`` for each row ``b``, computed for the whole
    batch with a fixed number of tensor operations per n-gram order.

    Args:
        candidates: ``[B, Lc]`` integer token ids, one candidate per row.
        references: ``[B, R, Lr]`` (R references per candidate) or ``[B, Lr]`` (one each).
        candidate_lengths: ``[B]`` number of real tokens in each row; tokens past it are ignored.
        reference_lengths: ``[B, R]`` (or ``[B]`` with 2-D references), likewise.
        reference_mask: ``[B, R]`` bool, False for reference slots a candidate does not have (so
            candidates may have different numbers of references). Each row needs one True.
        pad_id: when a lengths tensor is not given, the sequence ends at its first ``pad_id``;
            with neither, every position is a real token.
        weights: weight of each n-gram order 1..N; ``len(weights)`` sets N.
        smoothing: a :class:`Smoothing` or NLTK's method number (0..7).
        auto_reweigh: NLTK's option: candidates shorter than 4 tokens get uniform weights over the
            orders they have, when ``weights`` are the default 4-gram weights.

    Returns float64 so the scores agree with NLTK's double arithmetic; cast for use as rewards.
    """
    w = _check_weights(weights)
    smooth = _as_smoothing(smoothing)
    stats = _ngram_stats(
        candidates,
        references,
        candidate_lengths=candidate_lengths,
        reference_lengths=reference_lengths,
        reference_mask=reference_mask,
        pad_id=pad_id,
        max_order=_max_order(w, smooth),
    )
    order = len(w)
    extra = _METHOD5_ORDER - 1 if smooth.method in (5, 7) else order - 1
    return _bleu_from_stats(
        stats.matches[:, :order],
        stats.totals[:, :order],
        stats.hyp_lengths,
        stats.ref_lengths,
        w,
        smooth,
        auto_reweigh,
        stats.matches[:, extra],
        stats.totals[:, extra],
        stats.totals[:, :order],
    )


def corpus_bleu(
    candidates: Tensor,
    references: Tensor,
    *,
    candidate_lengths: Tensor | None = None,
    reference_lengths: Tensor | None = None,
    reference_mask: Tensor | None = None,
    pad_id: int | None = None,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    smoothing: Smoothing | int = 0,
    auto_reweigh: bool = False,
) -> Tensor:
    """One BLEU for the whole batch (micro-averaged, as NLTK's ``corpus_bleu``): a 0-dim float64.

    Matches and n-gram counts are summed over candidates before the precisions are formed, and
    the brevity penalty uses the summed lengths. As in NLTK, smoothing methods 5-7 take their
    per-sentence inputs (5-gram precision, n-gram counts) from the last candidate. Arguments
    are those of :func:`sentence_bleu`.
    """
    w = _check_weights(weights)
    smooth = _as_smoothing(smoothing)
    stats = _ngram_stats(
        candidates,
        references,
        candidate_lengths=candidate_lengths,
        reference_lengths=reference_lengths,
        reference_mask=reference_mask,
        pad_id=pad_id,
        max_order=_max_order(w, smooth),
    )
    if stats.matches.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64, device=candidates.device)
    order = len(w)
    extra = _METHOD5_ORDER - 1 if smooth.method in (5, 7) else order - 1
    score = _bleu_from_stats(
        stats.matches[:, :order].sum(dim=0, keepdim=True),
        # NLTK sums each sentence's denominator, which is floored at 1 per sentence.
        stats.totals[:, :order].clamp(min=1).sum(dim=0, keepdim=True),
        stats.hyp_lengths.sum().reshape(1),
        stats.ref_lengths.sum().reshape(1),
        w,
        smooth,
        auto_reweigh,
        stats.matches[-1:, extra],
        stats.totals[-1:, extra],
        stats.totals[-1:, :order],
    )
    return score[0]
