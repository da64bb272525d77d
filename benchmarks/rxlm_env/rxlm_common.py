"""What the RxLM-side scripts share; like them, it runs inside an RxLM virtual environment.

* ``alpha_card``: the RxT-Alpha (Supervised) card's component and memory-attention options in
  RxLM's config vocabulary, at any size: rxlm_turns.py's alpha-mini and the tiny base of
  rxlm_fixtures.py's option matrix.
* ``read_state`` and ``ready``: a saved checkpoint's tensors, and a built model made ready for
  inference (components shared, eval, rxlm_workarounds.py's fixes, no autograd): the loading of
  rxlm_turns.py and rxlm_beta_full.py.
* ``timed_batch_interact``: one greedy-or-sampled ``batch_interact`` turn's steps and timestamps,
  which both of those report in their own way.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rxlm_workarounds.py beside it, from any caller


def alpha_card(
    *, vocab: int, dim: int, heads: int, layers: int, slots: int, seq: int, groups: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(decoder/encoder options, memory attention options) of the RxT-Alpha card at this size:
    gated SiLU feed-forward, RMS norms, SQA with ``groups`` query and key/value heads everywhere,
    self-interlayer memory attention with classic-rms norms and linear sigmoid per-slot gates."""
    shape = dict(
        num_layers=layers, embed_dim=dim, att_heads=heads, seq_len=seq, stm_size=slots, use_flash_attention=False
    )
    component = dict(
        shape,
        vocab_size=vocab,
        use_gated=True,
        ff_activation="silu",
        ff_dropout=0.0,
        att_dropout=0.0,
        use_rms_norm=True,
        att_groups=groups,
        self_att_type="sqa",
        cross_att_type="sqa",
        att_query_groups=groups,
        cross_att_groups=groups,
        cross_att_query_groups=groups,
    )
    memory = dict(
        shape,
        att_groups=groups,
        att_type="sqa",
        att_query_groups=groups,
        interlayer_att_groups=groups,
        interlayer_att_type="sqa",
        interlayer_att_query_groups=groups,
        norm_type="classic-rms",
        use_gated_residual=True,
        residual_per_slot_gate=True,
        residual_gate_type="linear",
        use_tanh_residual_gate=False,
    )
    return component, memory


def read_state(directory: Path) -> dict[str, Any]:
    """Every tensor of a saved model directory (``model.safetensors``, or its shards), as stored."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in sorted(directory.glob("model*.safetensors")):
        state.update(load_file(str(file)))
    return state


def ready(model: Any) -> list[str]:
    """Share the components, switch to eval, apply the RxLM fixes ``interact`` and ``batch_interact``
    need, turn autograd off; the fixes' notes."""
    import torch
    from rxlm_workarounds import apply_workarounds

    model.share_components()
    model.eval()
    notes = apply_workarounds(model, dist_version("rxlm"), batch=True)
    torch.set_grad_enabled(False)
    return notes


@dataclass
class BatchTurn:
    """A ``batch_interact`` turn: decode steps and ``time.perf_counter`` stamps (0.0: never seen)."""

    conversations: int
    steps: int
    start: float
    first: float  # the first step's tokens
    last: float  # the last step's tokens
    update_start: float  # the -1 row: the memory update begins
    update_end: float  # the -2 row: it has ended


def timed_batch_interact(model: Any, queries: list[list[int]], answer_tokens: int, **sampling: Any) -> BatchTurn:
    """One ``batch_interact`` turn of ``len(queries)`` conversations on ``[BOS] [Q] query`` ids
    (``[A]`` appended by RxLM), from a fresh batched STM, with RxLM's ``sampling`` arguments."""
    import torch

    n = len(queries)
    prompts = [[model.bos_token_id, model.query_token_id, *q] for q in queries]
    limit = max(map(len, prompts)) + 1 + answer_tokens
    ids = torch.full((n, limit), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, limit), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    model.set_batch_mode(True, n)
    start = time.perf_counter()
    first = last = update_start = update_end = 0.0
    steps = 0
    for out in model.batch_interact(ids, mask, max_seq_len=limit, **sampling):
        now = time.perf_counter()
        if bool((out == -1).all()):
            update_start = now
        elif bool((out == -2).all()):
            update_end = now
        else:
            steps += 1
            first = first or now
            last = now
    return BatchTurn(n, steps, start, first, last, update_start, update_end)
