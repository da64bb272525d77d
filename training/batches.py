"""Token batches: the message template, right padding and the masks each loss needs.

Every sequence is right-padded with ``[PAD]``. Causal attention never lets a real token see a
later pad, so the decoder needs no mask; the encoder and memory attention get ``attention_mask``
(1 for real tokens). Targets are the next tokens, with ``-100`` wherever no loss is wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rxruntime.models.tokenizer import RxTokenizer

from .data.dialogues import Dialogue, Turn

IGNORE = -100


@dataclass
class TokenBatch:
    """Right-padded ids (B, T), their mask (B, T), and next-token targets (B, T-1)."""

    ids: Tensor
    mask: Tensor
    targets: Tensor

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


def encode_many(tokenizer: RxTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Plain texts -> ids without special tokens, in one batched call into the Rust tokenizer."""
    return [list(e.ids) for e in tokenizer.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists to one (B, T) tensor and its (B, T) mask."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def text_batch(tokenizer: RxTokenizer, texts: Sequence[str], max_len: int) -> TokenBatch:
    """Stage 1: ``[BOS] text [EOS]``, truncated to ``max_len``; every real next token is a target."""
    s = tokenizer.special
    rows = [[*[s.bos_id, *ids][: max_len - 1], s.eos_id] for ids in encode_many(tokenizer, texts)]
    ids, mask = pad(rows, s.pad_id)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    return TokenBatch(ids, mask, targets)


def interaction_batch(
    tokenizer: RxTokenizer, turns: Sequence[Turn], max_len: int, answer_only: bool = False
) -> TokenBatch:
    """``[BOS] [Q] query [A] answer [EOS]`` rows. ``answer_only`` keeps targets after ``[A]`` only.

    A row longer than ``max_len`` is cut, keeping its closing ``[EOS]``.
    """
    s = tokenizer.special
    queries = encode_many(tokenizer, [t.query for t in turns])
    answers = encode_many(tokenizer, [t.answer for t in turns])
    rows, starts = [], []
    for q, a in zip(queries, answers):
        row = tokenizer.interaction_from_ids(q, a)
        rows.append(row if len(row) <= max_len else [*row[: max_len - 1], s.eos_id])
        starts.append(tokenizer.answer_start(q))
    ids, mask = pad(rows, s.pad_id)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    if answer_only:
        # Position j predicts token j+1: keep a target only from the prompt's last token ([A]) on.
        first = torch.tensor(starts)[:, None] - 1
        in_answer = torch.arange(targets.shape[1])[None, :] >= first
        targets = targets.masked_fill(~in_answer, IGNORE)
    return TokenBatch(ids, mask, targets)


def dialogue_batches(
    tokenizer: RxTokenizer, dialogues: Sequence[Dialogue], max_len: int, answer_only: bool = True
) -> tuple[list[TokenBatch], Tensor]:
    """Turn ``t`` of every dialogue as one batch, plus a (turns, B) mask of which rows have turn ``t``.

    Dialogues shorter than the longest get an empty filler turn whose loss the mask removes.
    """
    n = max(len(d) for d in dialogues)
    filler = Turn("", "")
    batches = [
        interaction_batch(tokenizer, [d.turns[t] if t < len(d) else filler for d in dialogues], max_len, answer_only)
        for t in range(n)
    ]
    present = torch.tensor([[t < len(d) for d in dialogues] for t in range(n)], dtype=torch.bool)
    return batches, present


RECALL_KINDS = frozenset({"question", "unknown"})
"""Turns whose answer depends on what memory holds: a stated fact recalled, or its honest absence."""


def recall_turns(dialogues: Sequence[Dialogue]) -> Tensor:
    """A (turns, B) mask of the turns whose kind is in ``RECALL_KINDS`` (False past a dialogue's end)."""
    n = max(len(d) for d in dialogues)
    return torch.tensor(
        [[t < len(d) and d.turns[t].kind in RECALL_KINDS for d in dialogues] for t in range(n)], dtype=torch.bool
    )
