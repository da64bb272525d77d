"""Property tests over random small configs: every component gives finite tensors of the right shape."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rxruntime.models import (
    DecoderConfig,
    EncoderConfig,
    MemoryAttentionConfig,
    RxTConfig,
    RxTModel,
    SamplingParams,
    generate,
)


@st.composite
def configs(draw: st.DrawFn) -> RxTConfig:
    num_heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))

    def heads() -> tuple[int, int]:
        kv = draw(st.sampled_from([h for h in (1, 2, 4) if h <= num_heads]))
        q = kv * draw(st.sampled_from([m for m in (1, 2, 4) if kv * m <= num_heads]))
        return q, kv

    experts = draw(st.integers(1, 5))
    sq, skv = heads()
    cq, ckv = heads()
    eq, ekv = heads()
    mq, mkv = heads()
    return RxTConfig(
        vocab_size=draw(st.integers(10, 60)),
        dim=num_heads * head_dim,
        num_layers=draw(st.integers(1, 3)),
        stm_size=draw(st.integers(1, 9)),
        max_seq_len=draw(st.integers(8, 24)),
        decoder=DecoderConfig(
            num_heads=num_heads,
            self_q_heads=sq,
            self_kv_heads=skv,
            cross_q_heads=cq,
            cross_kv_heads=ckv,
            num_experts=experts,
            experts_per_token=draw(st.integers(1, experts)),
            expert_ffn_dim=draw(st.integers(4, 20)),
        ),
        encoder=EncoderConfig(
            num_heads=num_heads,
            self_q_heads=eq,
            self_kv_heads=ekv,
            memory_cross_attention=draw(st.booleans()),
            cross_q_heads=cq,
            cross_kv_heads=ckv,
            ffn_dim=draw(st.integers(4, 20)),
        ),
        memory_attention=MemoryAttentionConfig(
            variant=draw(st.sampled_from(["simple", "self", "interlayer", "self-interlayer"])),
            num_heads=num_heads,
            q_heads=mq,
            kv_heads=mkv,
            gate_type=draw(st.sampled_from(["elementwise", "linear"])),
            gate_per_slot=draw(st.booleans()),
            rope_on_keys=draw(st.booleans()),
        ),
    )


@settings(max_examples=30, deadline=None)
@given(config=configs(), batch=st.integers(1, 3), data=st.data())
def test_every_component_gives_finite_tensors_of_the_right_shape(
    config: RxTConfig, batch: int, data: st.DataObject
) -> None:
    torch.manual_seed(0)
    model = RxTModel(config).eval()
    c = config
    t = data.draw(st.integers(1, c.max_seq_len))
    ids = torch.randint(0, c.vocab_size, (batch, t))
    mask = torch.ones(batch, t, dtype=torch.bool)
    mask[0, max(1, t // 2) :] = False
    with torch.no_grad():
        stm = model.init_stm(batch)
        assert stm.shape == (batch, c.num_layers, c.stm_size, c.dim)
        logits = model.decoder_logits(ids, stm)
        assert logits.shape == (batch, t, c.vocab_size) and torch.isfinite(logits).all()
        encoded = model.encode(ids, mask, stm)
        assert encoded.shape == (batch, c.num_layers, t, c.dim) and torch.isfinite(encoded).all()
        new = model.update_memory(stm, encoded, mask)
        assert new.shape == stm.shape and torch.isfinite(new).all()
        layer = model.decoder.blocks[0]
        assert layer.self_attn.o_proj.in_features == c.decoder.self_q_heads * (c.dim // c.decoder.num_heads)
    if t < c.max_seq_len:
        out = generate(
            model, new, ids[:, :t].tolist(), SamplingParams(temperature=1.0, top_k=3, seed=1), max_new_tokens=3
        )
        assert all(len(o) <= 3 and all(0 <= i < c.vocab_size for i in o) for o in out)
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
