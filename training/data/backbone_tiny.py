"""A tiny random Llama GGUF of SmolLM2's shape family, for tests and the ``smol-ci`` recipe.

Same layout as SmolLM2-135M-Instruct's file, only small: the ``llama`` architecture with grouped
key/value heads, SwiGLU, RMSNorm, tied embeddings, a byte-level BPE with ChatML's control tokens
at ids 0-2, llama.cpp's per-head Q/K row permutation, Q4_1 blocks for the layers and Q8_0 for the
embedding (both quantized by ``gguf``'s own quantizer). Every value is a function of ``seed``, so
the file is the same on every machine, and tests can build it in a second instead of fetching the
98 MB one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\nHi! My name is Ada and I live in Lisbon.<|im_end|>\n",
    "<|im_start|>assistant\nNice to meet you, Ada. What is your favourite colour?<|im_end|>\n",
    "<|im_start|>user\nWhat is my name? Where do I live? I don't know your name.<|im_end|>\n",
    "<|im_start|>assistant\nYour name is Ada. You live in Lisbon. The capital of France is Paris.<|im_end|>\n",
    "the user asks and the assistant answers; user assistant user assistant 0123456789",
]


def tiny_tokenizer_json(vocab_size: int = 400) -> str:
    """A byte-level BPE (``tokenizer.json`` text) with ChatML's control tokens at ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return str(tok.to_str())


def write_tiny_gguf(
    path: str | Path,
    seed: int = 0,
    *,
    dim: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    ffn_dim: int = 128,
    vocab_size: int = 400,
    rope_base: float = 100000.0,
    norm_eps: float = 1e-5,
) -> Path:
    """Write the tiny random backbone to ``path`` and return it."""
    import json

    import gguf

    from rxruntime.models.backbone_gguf import SMOLLM2_SYSTEM

    rng = np.random.default_rng(seed)
    spec = json.loads(tiny_tokenizer_json(vocab_size))
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    n_vocab = len(tokens)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny random SmolLM2-shaped backbone")
    writer.add_license("apache-2.0")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(2048)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    types = [int(gguf.TokenType.CONTROL) if t in CHATML_SPECIALS else int(gguf.TokenType.NORMAL) for t in tokens]
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + SMOLLM2_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )

    def add(name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType | None) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if qtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    def matrix(rows: int, cols: int, std: float = 0.08) -> np.ndarray:
        return rng.normal(0.0, std, size=(rows, cols))

    def permute(w: np.ndarray, n: int) -> np.ndarray:  # llama.cpp's converter: halves -> pairs
        return w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    hd = dim // heads
    q41, q80 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    add("token_embd.weight", matrix(n_vocab, dim, 0.5), q80)
    add("output_norm.weight", 1.0 + 0.1 * rng.normal(size=dim), None)
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1.0 + 0.1 * rng.normal(size=dim), None)
        add(p + "attn_q.weight", permute(matrix(heads * hd, dim, 0.3), heads), q41)
        add(p + "attn_k.weight", permute(matrix(kv_heads * hd, dim, 0.3), kv_heads), q41)
        add(p + "attn_v.weight", matrix(kv_heads * hd, dim), q41)
        add(p + "attn_output.weight", matrix(dim, heads * hd), q41)
        add(p + "ffn_norm.weight", 1.0 + 0.1 * rng.normal(size=dim), None)
        add(p + "ffn_gate.weight", matrix(ffn_dim, dim), q41)
        add(p + "ffn_up.weight", matrix(ffn_dim, dim), q41)
        add(p + "ffn_down.weight", matrix(dim, ffn_dim), q41)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
