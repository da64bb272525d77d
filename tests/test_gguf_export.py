"""The turn benchmark's Llama as GGUF (``rxruntime/bench/gguf_export.py``) and llama.cpp running it.

The file is read back with ``gguf.GGUFReader`` in CI. The tests that load it in llama.cpp need
``llama-cpp-python``, which compiles llama.cpp on install and is therefore not in CI's extras:
they are skipped without it and run by hand (``pip install 'rxruntime[llamacpp]'``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rxruntime.bench.gguf_export import gguf_name, padded_ffn, permute_qk, unpermute_qk, write_gguf
from rxruntime.bench.turns import build_baseline
from rxruntime.models import RxTModel, preset

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python not installed: it compiles llama.cpp, so CI leaves it out "
    "(run by hand after pip install 'rxruntime[llamacpp]')",
)


@pytest.fixture(scope="module")
def llama() -> Any:
    """The nano preset's baseline: head_dim 16 with 4 query heads (not hidden/heads = 32), and
    an MLP width (599) that is no multiple of 32."""
    torch.manual_seed(0)
    model = RxTModel(preset("nano")).eval()
    out = build_baseline(model, max_positions=512, seed=0)
    assert out.config.head_dim * out.config.num_attention_heads != out.config.hidden_size
    assert out.config.intermediate_size % 32 != 0
    return out


@pytest.fixture(scope="module")
def gguf_file(llama: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(llama, tmp_path_factory.mktemp("gguf") / "nano-f32.gguf")


def test_permute_matches_llama_cpp_rope_pairs() -> None:
    # Row i of a head's first half pairs with row i + half in HF; llama.cpp wants them adjacent.
    w = torch.arange(2 * 8, dtype=torch.float32).reshape(2 * 8, 1)  # 2 heads of head_dim 8
    got = permute_qk(w, 2).flatten().tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    x = torch.randn(48, 5)
    assert torch.equal(unpermute_qk(permute_qk(x, 3), 3), x)


def test_names_and_padding() -> None:
    assert gguf_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    with pytest.raises(KeyError):
        gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert [padded_ffn(n) for n in (1, 32, 33, 2487)] == [32, 32, 64, 2496]


def test_gguf_file_reads_back(llama: Any, gguf_file: Path) -> None:
    """Metadata, shapes, and the exact HF weights after undoing the Q/K permutation and padding."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    cfg = llama.config

    def field(key: str) -> Any:
        f = reader.get_field(key)
        assert f is not None, key
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == cfg.num_hidden_layers
    assert field("llama.embedding_length") == cfg.hidden_size
    assert field("llama.feed_forward_length") == padded_ffn(cfg.intermediate_size)
    assert field("llama.attention.head_count") == cfg.num_attention_heads
    assert field("llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert field("llama.attention.key_length") == field("llama.attention.value_length") == cfg.head_dim
    assert field("llama.rope.dimension_count") == cfg.head_dim
    assert field("llama.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field("llama.context_length") == 512
    assert field("tokenizer.ggml.model") == "llama"
    assert len(field("tokenizer.ggml.tokens")) == cfg.vocab_size
    assert field("tokenizer.ggml.bos_token_id") == cfg.bos_token_id
    types = field("tokenizer.ggml.token_type")
    assert types[cfg.eos_token_id] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL

    tensors = {t.name: t for t in reader.tensors}
    state = llama.state_dict()
    assert len(tensors) == len(state)
    ffn = padded_ffn(cfg.intermediate_size)
    for hf_name, weight in state.items():
        t = tensors[gguf_name(hf_name)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        data = torch.from_numpy(np.array(t.data)).reshape([int(d) for d in reversed(t.shape)])
        if hf_name.endswith("q_proj.weight"):
            data = unpermute_qk(data, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = unpermute_qk(data, cfg.num_key_value_heads)
        elif hf_name.endswith(("gate_proj.weight", "up_proj.weight")):
            assert data.shape[0] == ffn and not data[cfg.intermediate_size :].any()
            data = data[: cfg.intermediate_size]
        elif hf_name.endswith("down_proj.weight"):
            assert data.shape[1] == ffn and not data[:, cfg.intermediate_size :].any()
            data = data[:, : cfg.intermediate_size]
        assert torch.equal(data, weight), hf_name
    hf_q = state["model.layers.0.self_attn.q_proj.weight"]
    stored_q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data)).reshape(hf_q.shape)
    assert not torch.equal(stored_q, hf_q)  # the permutation did move rows


# ---------------------------------------------------------------------- in llama.cpp (by hand)
def _hf_logits(llama: Any, ids: list[int]) -> np.ndarray[Any, Any]:
    with torch.inference_mode():
        return np.asarray(llama(input_ids=torch.tensor([ids])).logits[0].double().numpy())


@needs_llama_cpp
def test_llama_cpp_logits_equal_transformers(llama: Any, gguf_file: Path) -> None:
    """The f32 GGUF through llama.cpp gives HF's logits: proves the permutation, the head layout
    and the metadata. f32 KV cache and no flash attention (both round to f16 by default)."""
    from rxruntime.bench.llamacpp_runtime import LlamaCppModel

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(7, llama.config.vocab_size, (60,), generator=gen).tolist()
    ref = _hf_logits(llama, ids)
    with LlamaCppModel(gguf_file, n_ctx=128, n_batch=128, n_threads=2, kv_type="f32", flash_attn=False) as lm:
        assert lm.n_vocab == llama.config.vocab_size
        for end in (20, 21, 60):  # a prefill, one cached step, then a longer extension
            got = lm.decode(ids[lm.n_tokens : end]).astype(np.float64)
            want = ref[end - 1]
            assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), end
        lm.clear()
        got = lm.decode(ids).astype(np.float64)
        assert np.abs(got - ref[-1]).max() <= 1e-3 * np.abs(ref[-1]).max()


@needs_llama_cpp
def test_q8_0_is_llama_cpp_quantised(llama: Any, gguf_file: Path, tmp_path: Path) -> None:
    import gguf

    from rxruntime.bench.gguf_export import quantize_gguf
    from rxruntime.bench.llamacpp_runtime import LlamaCppModel

    q8 = quantize_gguf(gguf_file, tmp_path / "q8.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}
    Q8 = gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == Q8  # the padded width makes whole 32-column blocks
    assert all(types[f"blk.{i}.{n}.weight"] == Q8 for i in range(4) for n in ("attn_q", "attn_k", "ffn_up"))
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert q8.stat().st_size < gguf_file.stat().st_size / 3
    ids = list(range(10, 40))
    ref = _hf_logits(llama, ids)[-1]
    with LlamaCppModel(q8, n_ctx=64, n_batch=64, n_threads=2) as lm:
        got = lm.decode(ids).astype(np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.1  # rounded, but the same model


@needs_llama_cpp
def test_cached_and_reread_modes_answer_alike(llama: Any, gguf_file: Path) -> None:
    """Prompt caching changes the work, not the answers: over three turns both modes produce HF's
    greedy answers (exact settings), so the cached mode's bookkeeping of pending tokens is right."""
    from rxruntime.bench.llamacpp_runtime import LlamaCppModel
    from rxruntime.bench.llamacpp_turns import PeerSession
    from rxruntime.bench.turns import _baseline_turn

    eos = llama.config.eos_token_id
    gen = torch.Generator().manual_seed(2)
    prompts = [[2, 4, *torch.randint(7, 1024, (12,), generator=gen).tolist(), 5] for _ in range(3)]
    peers = [
        PeerSession(
            mode, LlamaCppModel(gguf_file, n_ctx=256, n_batch=256, n_threads=2, kv_type="f32", flash_attn=False), eos
        )
        for mode in ("cached", "reread")
    ]
    history: list[int] = []
    for peer in peers:
        peer.start_conversation()
    for prompt in prompts:
        _, want = _baseline_turn(llama, history + prompt, 10, 0.0)
        for peer in peers:
            ttft, turn, answer = peer.turn(history, prompt, 10)
            assert answer == want, peer.mode
            assert 0 < ttft <= turn
        history += [*prompt, *want, eos]
    cached = peers[0].model
    assert cached.n_tokens == len(history) - 2  # all but the last answer token and EOS
    # What llama_state_seq_get_size measures: K and V of every layer for each cached token (f32
    # here), plus a header of about a kilobyte.
    cfg = llama.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert 0 < cached.sequence_state_bytes() - cached.n_tokens * per_token < 4096
    cached.clear()
    assert cached.sequence_state_bytes() < 4096
    for peer in peers:
        peer.model.close()
