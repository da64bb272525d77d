"""The masked-language-model head and token masking for the encoder's half of joint training.

The head is a training-only module: it is saved in the training state (so ``--resume`` is exact)
but never in a model directory, so the shipped ``RxTModel`` has no MLM weights. The tokenizer
has no ``[MASK]`` token; byte-level BPE never emits ``[UNK]``, so ``[UNK]`` plays that role.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rxruntime.models.config import RxTConfig

from .batches import IGNORE


class MLMHead(nn.Module):
    """Encoder's last hidden states (B, T, D) -> token logits (B, T, V): norm, then a projection."""

    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.proj = nn.Linear(config.dim, config.vocab_size, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(self.norm(hidden))


def mask_tokens(
    ids: Tensor,
    mask: Tensor,
    prob: float,
    mask_id: int,
    first_regular_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """BERT-style corruption of real, non-special tokens: returns (encoder input ids, MLM labels).

    Each eligible token is chosen with probability ``prob``; a chosen token becomes ``mask_id``
    80% of the time, a random regular token 10%, and stays itself 10%. Labels are the original id
    at chosen positions and ``-100`` elsewhere.
    """
    eligible = (mask > 0) & (ids >= first_regular_id)
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & eligible
    labels = ids.masked_fill(~chosen, IGNORE)
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(first_regular_id, vocab_size, ids.shape, generator=generator)
    corrupted = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    corrupted = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
    return corrupted, labels
