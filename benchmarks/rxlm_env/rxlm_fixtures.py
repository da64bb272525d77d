"""Writes the RxLM parity fixtures: tiny random RxLM models, saved by RxLM, with what RxLM computes.

rxruntime must load RxLM checkpoints and compute exactly what RxLM computes (issue 11). This
script is the oracle side: it runs inside an RxLM virtual environment (RxLM pins
transformers < 5, so it never runs in ours), builds one small random ``RxTAlpha``/``RxTBeta``
per case of the option matrix, saves it with RxLM's own ``save_pretrained`` and records, for
fixed inputs, the decoder logits, three greedy ``interact`` turns with the STM after each
memory update, and the STM initialised from text. The contract of the files it writes is in
tests/fixtures/rxlm/README.md::

    /work/venvs/rxlm-0.2.31/bin/python benchmarks/rxlm_env/rxlm_fixtures.py --out tests/fixtures/rxlm
    /work/venvs/rxlm-0.2.45/bin/python benchmarks/rxlm_env/rxlm_fixtures.py --out tests/fixtures/rxlm
    /work/venvs/rxlm-0.3.80/bin/python benchmarks/rxlm_env/rxlm_fixtures.py --out tests/fixtures/rxlm
    /work/venvs/rxlm-0.3.93/bin/python benchmarks/rxlm_env/rxlm_fixtures.py --out tests/fixtures/rxlm

Deterministic: every case seeds torch from its name; the tokenizer is trained by RxLM's own
``TokenizerTrainer`` on the fixed corpus below (given the byte-level decoder RxLM leaves out).
RxTBeta 0.3 cases run Beta's own ``interact`` template (``thinking_mode``), and the
``system_first`` ones read a system prompt into memory before their turns. Workarounds for RxLM 0.3
bugs (0.3.80's ``prepare_stm_kv_cache`` calls ``split_kv_head`` with one argument too many; the
``reset_self_attn_cache`` of 0.3.80 and 0.3.93 iterates ``stateless_layers`` even when there are
none and forgets ``final_stateless_layers``) are applied to the instance
(benchmarks/rxlm_env/rxlm_workarounds.py) and listed in each case's expected.json under ``workarounds``.
The ``beta_published_*`` cases have RxT-Beta's published shapes at a small size (issue 23).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rxlm_common import alpha_card
from rxlm_workarounds import apply_workarounds

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[Q]", "[A]", "[T]", "[C]", "[U]", "[I]", "[MASK]"]
VOCAB_SIZE = 300
CORPUS = """\
Once upon a time there was a little robot who lived in a quiet town by the sea.
Every morning the robot walked to the harbour and counted the boats that came home.
The fishermen liked the robot because it remembered every name and every story they told.
One day a girl asked the robot what it remembered best, and the robot said: the first question.
Memory is what makes a conversation feel like a conversation, not a list of answers.
What is your name? My name is Rex. Where do you live? I live near the old lighthouse.
Tell me a story about the sea. The sea was calm, the wind was soft, and the stars were bright.
Can you remember what I said before? You said that you like the blue boat the most.
The teacher wrote numbers on the board: one, two, three, four, five, six, seven, eight.
Cats and dogs played in the garden while the children were reading books under the tree.
"""
QUERIES = ["Tell me a story about the sea.", "What is your name?", "Can you remember what I said before?"]
PROMPT = ("What is your name?", "My name is Rex.")
STM_TEXT = ("You are a helpful robot.", "I remember every story.")
BETA_SYSTEM_PROMPT = "You are a helpful robot who remembers every story."
EOS_BOOST = 0.8
MAX_SEQ_LEN = 36  # interact's limit on [BOS][Q]query[A]answer


@dataclass
class Case:
    """One point of the option matrix: overrides on the tiny base configs (``case_configs``)."""

    name: str
    versions: tuple[str, ...]
    cls: str = "RxTAlpha"
    variant: str | None = "self-interlayer"  # None: the class default, passed nowhere
    decoder: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    thinking_mode: str = "fast"  # RxTBeta 0.3 interact: 'fast' appends [A], 'extended' appends [T]
    system_first: bool = False  # RxTBeta 0.3: turns start from the STM the system prompt wrote
    seed: str = ""  # seeds torch from this name instead of the case's (cases that share weights)


BOTH = ("0.2.31", "0.3.80")
V02 = ("0.2.31",)
V03 = ("0.3.80",)
V03_BOTH = ("0.3.80", "0.3.93")  # 0.3.91 stopped shifting decode steps by one position
V02_STATELESS = ("0.2.45",)  # 0.2.38-0.2.45 build stateless layers (saved in a 0.2 checkpoint)

MOE = dict(use_moe=True, num_experts=4, moe_top_k=2, ff_dim=8)

# RxT-Beta's published configuration (issue 23) at a small size: dim 64 with 16 heads (head dim 4),
# SQA 8 query / 4 key-value heads, 16 experts top-10 with 2 shared experts and global biases, the
# bf16 router, stateless layers before and after, gated self- but ungated cross-attention, no
# attention output bias, RMS head norm, rope_base 100000; encoder SQA 8/8, gated attention;
# grouped-self-interlayer memory attention in 3 groups, classic-rms, elementwise per-slot sigmoid gates.
BETA_DIM = dict(embed_dim=64, att_heads=16, num_layers=3, seq_len=80, rope_base=100000)
BETA_DECODER = dict(
    BETA_DIM,
    self_att_type="sqa",
    att_query_groups=8,
    att_groups=4,
    cross_att_type="sqa",
    cross_att_groups=4,
    cross_att_query_groups=8,
    use_moe=True,
    num_experts=16,
    moe_top_k=10,
    ff_dim=4,
    num_shared_experts=2,
    shared_expert_dim=8,
    moe_bias_mode="global",
    moe_shared_experts_bias_mode="global",
    stateless_layers_config=["dense", "moe"],
    final_stateless_layers_config=["moe", "moe"],
    dense_layer_dim=24,
    use_gated_attention=True,
    use_gated_cross_attention=False,
    use_attention_output_bias=False,
    use_head_norm=True,
    head_norm_type="rms_norm",
    router_amp=True,
    router_dtype="bfloat16",
)
BETA_ENCODER = dict(
    BETA_DIM,
    self_att_type="sqa",
    att_query_groups=8,
    att_groups=8,
    ff_dim=24,
    use_gated_attention=True,
)
BETA_MEMORY = dict(
    BETA_DIM,
    num_groups=3,
    att_type="sqa",
    att_query_groups=8,
    att_groups=4,
    interlayer_att_type="sqa",
    interlayer_att_query_groups=8,
    interlayer_att_groups=4,
    norm_type="classic-rms",
    use_gated_residual=True,
    residual_gate_type="elementwise",
    residual_per_slot_gate=True,
    use_tanh_residual_gate=False,
)
BETA_OPTIONS = {
    "layout": "RxT-Beta-Supervised's published options at dim 64 (16 heads of 4), 3 memory layers, 16 experts",
    "attention": "sqa 8 query / 4 kv heads of 16 (self and cross); gated self-attention, ungated cross;"
    " no output bias; encoder sqa 8/8 gated",
    "ff": "vectorized gated moe 16 top-10 width 4 + 2 shared experts (width 8, softmax-mixed) with global"
    " routed and shared biases; router_amp with router_dtype bfloat16",
    "stateless": "['dense', 'moe'] before (dense width 24), ['moe', 'moe'] after the memory layers",
    "head_norm": "rms_norm; rope_base 100000",
    "memory": "grouped-self-interlayer, 3 groups, classic-rms, elementwise sigmoid per-slot gates",
}


def beta_published(thinking_mode: str) -> Case:
    """RxT-Beta's published shapes (issue 23) in one thinking mode: both modes and both releases
    share one seed, so one model.safetensors (git stores it once)."""
    return Case(
        f"beta_published_{thinking_mode}",
        V03_BOTH,
        cls="RxTBeta",
        variant="grouped-self-interlayer",
        decoder=dict(BETA_DECODER),
        encoder=dict(BETA_ENCODER),
        memory=dict(BETA_MEMORY),
        system_first=True,
        thinking_mode=thinking_mode,
        seed="beta_published",
        options={**BETA_OPTIONS, "template": f"system prompt read into memory, then thinking_mode={thinking_mode!r}"},
    )


CASES: list[Case] = [
    Case(
        "alpha_supervised",
        BOTH,
        decoder=dict(MOE),
        options={
            "layout": "RxT-Alpha-Supervised card",
            "attention": "sqa 2/4 q, 2/4 kv",
            "ff": "gated moe 4 top-2 (0.3.80: vectorized, 1 shared expert, global bias by default)",
            "memory": "self-interlayer, linear sigmoid per-slot gates, classic-rms",
        },
    ),
    Case(
        "interlayer_static_tanh",
        BOTH,
        variant="interlayer",
        memory=dict(residual_gate_type="static", residual_per_slot_gate=False, use_tanh_residual_gate=True),
        options={
            "variant": "'interlayer' (0.2.31 builds interlayer; 0.3.80 builds self-interlayer)",
            "gate": "static tanh per layer",
            "ff": "dense gated",
        },
    ),
    Case(
        "variant_simple",
        BOTH,
        variant="simple",
        memory=dict(residual_gate_type="static", residual_per_slot_gate=True, use_tanh_residual_gate=False),
        options={
            "variant": "'simple' in config: RxTAlpha builds self-interlayer for it (only names it knows differ)",
            "gate": "static sigmoid per slot",
        },
    ),
    Case(
        "beta_gqa_mqa_elementwise",
        BOTH,
        cls="RxTBeta",
        variant=None,
        decoder=dict(self_att_type="gqa", cross_att_type="mqa", use_head_norm=True),
        encoder=dict(self_att_type="gqa", cross_att_type="mqa"),
        memory=dict(
            interlayer_att_type="mqa",
            residual_gate_type="elementwise",
            residual_per_slot_gate=True,
            use_tanh_residual_gate=True,
            norm_type="rms",
        ),
        options={
            "class": "RxTBeta (variant not passed: class default self-interlayer)",
            "attention": "decoder gqa self (2 kv groups) / mqa cross",
            "head_norm": "use_head_norm (LayerNorm)",
            "gate": "elementwise tanh per slot",
            "memory_norm": "rms (SimpleRMSMemoryNorm)",
        },
    ),
    Case(
        "mha_layernorm_dense",
        BOTH,
        variant="interlayer",
        decoder=dict(
            self_att_type="mha",
            cross_att_type="mha",
            use_rms_norm=False,
            use_gated=False,
            ff_activation="gelu",
            ff_dim=16,
        ),
        encoder=dict(
            use_rms_norm=False,
            use_gated=False,
            ff_activation="gelu",
        ),
        memory=dict(
            att_type="mha",
            norm_type="layer",
            residual_gate_type="elementwise",
            residual_per_slot_gate=False,
            use_tanh_residual_gate=False,
        ),
        options={
            "attention": "mha in decoder (self, cross) and memory attention main layers",
            "norms": "LayerNorm layers (use_rms_norm False)",
            "ff": "dense, not gated, gelu",
            "memory_norm": "layer (MemoryLayerNorm)",
            "gate": "elementwise sigmoid per layer",
        },
    ),
    Case(
        "positional_norm_linear_status",
        BOTH,
        decoder=dict(att_groups=1, att_query_groups=2, cross_att_groups=2, cross_att_query_groups=1),
        encoder=dict(att_groups=1, att_query_groups=2),
        memory=dict(
            norm_type="positional",
            norm_per_dim_scale=True,
            residual_gate_type="linear",
            residual_per_slot_gate=False,
            residual_gate_slot_status_type="linear",
            use_tanh_residual_gate=True,
        ),
        options={
            "attention": "sqa q2/kv1 self (enable_gqa), cross revSQA q1/kv2 (q repeated)",
            "memory_norm": "positional (ema_rms buffer, per-dim scale)",
            "gate": "linear tanh per layer, linear slot status",
        },
    ),
    Case(
        "adaptive_norm_plain_residual",
        BOTH,
        decoder=dict(use_moe=True, num_experts=4, moe_top_k=1, ff_dim=8, use_gated=False, ff_activation="relu"),
        memory=dict(norm_type="adaptive", use_gated_residual=False),
        options={
            "ff": "non-gated moe 4 top-1 relu",
            "memory_norm": "adaptive (eval: per-slot rms)",
            "gate": "none (use_gated_residual False: new + old)",
        },
    ),
    Case(
        "elementwise_linear_status",
        BOTH,
        memory=dict(
            residual_gate_type="elementwise",
            residual_per_slot_gate=True,
            residual_gate_slot_status_type="linear",
            use_tanh_residual_gate=False,
        ),
        options={"gate": "elementwise sigmoid per slot with a linear slot status (Linear(d, 1))"},
    ),
    Case(
        "legacy_encoder_cross_attention",
        BOTH,
        encoder=dict(skip_memory_cross_attention=False),
        options={
            "encoder": "memory cross-attention built (config default): 0.2.31 reads the encoder's own saved STM "
            "buffer encoder.model.stm.memory; 0.3.80 builds the weights but never runs them",
        },
    ),
    Case(
        "beta_stateless_shared_experts",
        V03,
        cls="RxTBeta",
        variant=None,
        decoder=dict(
            MOE,
            stateless_layers_config=["dense"],
            final_stateless_layers_config=["dense"],
            dense_layer_dim=24,
            num_shared_experts=1,
            use_head_norm=True,
            head_norm_type="rms_norm",
        ),
        options={
            "layout": "RxT-Beta style decoder",
            "stateless": "1 dense stateless layer before and 1 after the memory layers (ff dense_layer_dim)",
            "ff": "vectorized gated moe 4 top-2 + 1 shared expert (local bias), global routed bias",
            "head_norm": "rms_norm",
        },
    ),
    Case(
        "moe_two_shared_local_bias",
        V03,
        decoder=dict(
            MOE,
            num_shared_experts=2,
            shared_expert_dim=12,
            moe_bias_mode="local",
            moe_shared_experts_bias_mode="global",
            moe_use_weighted_shared_experts=True,
            stateless_layers_config=["moe"],
        ),
        options={
            "ff": "vectorized gated moe, local expert biases, 2 shared experts (softmax gate, stacked weights,"
            " global shared bias), weighted shared experts",
            "stateless": "1 moe stateless layer before the memory layers",
        },
    ),
    Case(
        "moe_no_bias_no_shared",
        V03,
        decoder=dict(MOE, num_shared_experts=0, moe_bias_mode="off", ff_activation="gelu"),
        options={"ff": "vectorized gated moe (gelu), moe_bias_mode off, no shared expert"},
    ),
    Case(
        "moe_legacy_layout",
        V03,
        decoder=dict(MOE, use_vectorized_moe=False, num_shared_experts=1),
        options={"ff": "use_vectorized_moe False: ModuleList experts (0.2.31 layout) + shared_experts ModuleList"},
    ),
    Case(
        "grouped_self_interlayer",
        V03,
        variant="grouped-self-interlayer",
        decoder=dict(num_layers=4),
        encoder=dict(num_layers=4),
        memory=dict(num_layers=4, num_groups=2),
        options={"variant": "grouped-self-interlayer, 4 layers in 2 groups"},
    ),
    Case(
        "gated_attention_no_out_bias",
        V03,
        decoder=dict(use_gated_attention=True, use_attention_output_bias=False, rope_base=1000),
        encoder=dict(use_attention_output_bias=False, rope_base=1000),
        memory=dict(rope_base=1000),
        options={
            "attention": "gated attention (sigmoid(gate_proj(x)) * attn before out_proj), out_proj without bias",
            "rope_base": 1000,
        },
    ),
    Case(
        "beta_system_fast",
        V03,
        cls="RxTBeta",
        variant=None,
        decoder=dict(MOE, stateless_layers_config=["dense"], dense_layer_dim=24, use_head_norm=True, seq_len=80),
        encoder=dict(seq_len=80),
        memory=dict(seq_len=80),
        system_first=True,
        options={
            "template": "RxTBeta's own: system prompt [BOS][I]title\\n\\ntext[EOS] read into memory first, then"
            " three interact turns in thinking_mode='fast' ([BOS][Q]query[A])",
            "ff": "vectorized gated moe 4 top-2 + 1 shared expert, 1 dense stateless layer",
        },
    ),
    Case(
        "beta_system_extended",
        V03,
        cls="RxTBeta",
        variant=None,
        decoder=dict(seq_len=80),
        encoder=dict(seq_len=80),
        memory=dict(seq_len=80),
        system_first=True,
        thinking_mode="extended",
        options={
            "template": "RxTBeta's own: system prompt read into memory first, then three interact turns in"
            " thinking_mode='extended' ([BOS][Q]query[T])",
        },
    ),
    Case(
        "stateless_layers_02",
        V02_STATELESS,
        decoder=dict(MOE, stateless_layers_config=["dense", "moe"], dense_layer_dim=24),
        options={
            "stateless": "RxLM 0.2.38-0.2.45: ['dense', 'moe'] stateless layers before the memory layers, built as"
            " ClassicTransformerLayer (norm1, norm2 = feed-forward norm), 0.2 MoE (per-expert biases)",
            "why": "config.json has stateless_layers_config and the file stateless_layers.*, as 0.3's do: a 0.2"
            " checkpoint that must not be taken for 0.3",
        },
    ),
    *(beta_published(mode) for mode in ("fast", "extended")),
]


def case_configs(case: Case, vocab: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(decoder, encoder, memory attention) options of ``case``: its overrides on the RxT-Alpha card
    at dim 24 (4 heads, SQA with 2 query and 2 key/value heads), 2 layers, 8 STM slots, a dense gated
    feed-forward of width 32, no dropout; the encoder skips memory cross-attention unless told."""
    component, memory = alpha_card(vocab=vocab, dim=24, heads=4, layers=2, slots=8, seq=40, groups=2)
    component.update(use_moe=False, ff_dim=32)
    memory.update(att_dropout=0.0, interlayer_att_dropout=0.0)
    decoder = {**component, **case.decoder}
    encoder = {**component, "skip_memory_cross_attention": True, **case.encoder}
    return decoder, encoder, {**memory, **case.memory}


def case_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def build_tokenizer(workdir: Path) -> Any:
    """RxLM's own byte-level BPE trainer on the fixed corpus, wrapped as RxLM loads tokenizers."""
    from rxlm.training.tokenizer import TokenizerTrainer, load_tokenizer_from_file

    corpus = workdir / "corpus.txt"
    corpus.write_text(CORPUS)
    # RxLM's default pair template lacks a space between [EOS] and [BOS] and is rejected by tokenizers
    trainer = TokenizerTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        post_processor_pair="[BOS] $A [EOS] [BOS] $B:1 [EOS]:1",
    )
    trainer.train([str(corpus)], show_progress=False)
    # RxLM's trainer sets no decoder, so plain decoding shows its byte symbols ('Ġ' for a space) and
    # RxLM patches a few of them back per token (decode_post_process). The byte-level decoder is the
    # exact inverse of the byte-level pre-tokenizer: text decodes as written. Encoding is unchanged.
    from tokenizers import decoders

    trainer.tokenizer.decoder = decoders.ByteLevel()
    trainer.save(str(workdir / "tok"))
    return load_tokenizer_from_file(str(workdir / "tok" / "tokenizer.json"))


def token_config(tok: Any, cls: str) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = dict(
        bos_token_id=ids["[BOS]"],
        eos_token_id=ids["[EOS]"],
        answer_token_id=ids["[A]"],
        query_token_id=ids["[Q]"],
        pad_token_id=ids["[PAD]"],
    )
    if cls == "RxTBeta":
        cfg.update(
            think_token_id=ids["[T]"],
            tool_call_token_id=ids["[C]"],
            tool_use_token_id=ids["[U]"],
            internal_token_id=ids["[I]"],
        )
    return cfg


def perturb(model: nn.Module, gen: torch.Generator) -> None:
    """Random weights everywhere, constants included (norm scales, gates), so every one is tested."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("ema_rms"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


class Recorder:
    """Wraps ``model.forward`` to see the ids each decode/update call received."""

    def __init__(self, model: Any) -> None:
        from rxlm.rxt.models import RxTForwardAction

        self.model = model
        self.action = RxTForwardAction
        self.decode_inputs: list[torch.Tensor] = []
        self.update_inputs: list[torch.Tensor] = []
        self.step_logits: list[torch.Tensor] = []
        self._orig = model.forward

        def forward(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = self._orig(input_ids, *args, **kwargs)
            if kwargs.get("action", self.action.DECODE) == self.action.DECODE:
                self.decode_inputs.append(input_ids.clone())
                self.step_logits.append(out[0, -1].clone())
            else:
                self.update_inputs.append(input_ids.clone())
            return out

        model.forward = forward

    def reset(self) -> None:
        self.decode_inputs.clear()
        self.update_inputs.clear()
        self.step_logits.clear()


def canonical_header(path: Path) -> None:
    """Sort the alias map safetensors writes for shared tensors (its order follows memory addresses).

    Only the order of ``__metadata__`` keys changes, the header keeps its length and every tensor
    its bytes, so regenerating the fixtures gives byte-equal files.
    """
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if meta is not None:
        header = {"__metadata__": dict(sorted(meta.items())), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, (len(text), n)
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])


def stm_of(model: Any) -> torch.Tensor:
    mem = model.export_stm_state()
    assert mem.dim() == 4 and mem.size(1) == 1, mem.shape
    return mem[:, 0].float().contiguous()


def run_case(case: Case, version: str, tok: Any, tok_dir: Path, out: Path) -> dict[str, Any]:
    import rxlm.rxt.models as rxm

    torch.manual_seed(case_seed(case.seed or case.name))
    gen = torch.Generator().manual_seed(case_seed(case.seed or case.name))
    decoder, encoder, memory = case_configs(case, len(tok))
    cls = getattr(rxm, case.cls)
    kwargs: dict[str, Any] = dict(
        decoder_config=decoder,
        encoder_config=encoder,
        memory_attention_config=memory,
        tokenizer_config=token_config(tok, case.cls),
    )
    if case.variant is not None:
        kwargs["memory_attention_variant"] = case.variant
    model = cls(**kwargs, tokenizer=tok)
    perturb(model, gen)
    with torch.no_grad():  # raise [EOS] so that some greedy answers end on it before the length limit
        model.decoder.model.head.bias[model.eos_token_id] += EOS_BOOST

    case_dir = out / version / case.name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    # Saved before share_components: saved after it, the file keeps one embedding and one STM under the
    # decoder's names, and RxLM's own from_pretrained + share_components then runs a random encoder
    # embedding. Before it, every component's tensors are in the file; share_components then gives the
    # decoder the encoder's embedding (the decoder's own saved embedding is unused; here they differ).
    model.save_pretrained(str(case_dir))
    canonical_header(case_dir / "model.safetensors")
    tok.save_pretrained(str(case_dir))
    shutil.copy(tok_dir / "tokenizer.json", case_dir / "tokenizer.json")
    model.share_components()
    model.eval()

    workarounds = apply_workarounds(model, version)
    rec = Recorder(model)
    tensors: dict[str, torch.Tensor] = {}
    layers, slots, dim = memory["num_layers"], memory["stm_size"], memory["embed_dim"]
    stm_init = torch.randn(layers, slots, dim, generator=gen)
    tensors["stm_init"] = stm_init

    with torch.no_grad():
        # 1. decoder logits, full forward without caches, reading stm_init
        model.load_stm_state(stm_init.unsqueeze(1).clone())
        prompt = model.tokenize_full_interaction(*PROMPT, max_seq_len=MAX_SEQ_LEN)["input_ids"]
        logits = model(prompt, attention_mask=torch.ones_like(prompt))
        tensors["prompt_ids"] = prompt.long()
        tensors["prompt_logits"] = logits.float()

        # 2. three greedy interact turns from stm_init (system_first: from the STM the system prompt wrote)
        model.load_stm_state(stm_init.unsqueeze(1).clone())
        interact_kwargs: dict[str, Any] = dict(max_seq_len=MAX_SEQ_LEN, temperature=1.0, top_k=1)
        beta_mode = case.cls == "RxTBeta" and version.startswith("0.3")
        mode_token = model.answer_token_id
        if beta_mode:
            interact_kwargs["thinking_mode"] = case.thinking_mode
            mode_token = model.answer_token_id if case.thinking_mode == "fast" else model.think_token_id
        if case.system_first:
            assert beta_mode, "system_first needs RxTBeta 0.3's tokenize_system_prompt"
            system = model.tokenize_system_prompt(BETA_SYSTEM_PROMPT, max_seq_len=MAX_SEQ_LEN * 2)
            # untruncated, and within the model's own length (rxruntime cuts a system text there)
            assert system["input_ids"].shape[1] < min(MAX_SEQ_LEN * 2, decoder["seq_len"]), "system prompt too long"
            model.init_stm_state(**system)
            tensors["turns_init_stm"] = stm_of(model)
        for i, query in enumerate(QUERIES, start=1):
            rec.reset()
            q = model.tokenize_query(query, max_seq_len=MAX_SEQ_LEN)
            yielded = list(model.interact(**q, **interact_kwargs))
            assert yielded[-2:] == [-1, -2], yielded
            answer = yielded[:-2]
            if beta_mode:
                assert answer[0] == mode_token  # interact echoes the mode token it appended first
                answer = answer[1:]
            fed = rec.decode_inputs[0]
            assert len(rec.update_inputs) == 1
            steps = torch.stack(rec.step_logits)
            assert steps.argmax(-1).tolist() == answer, "top_k=1 sampling must equal argmax"
            tensors[f"turn{i}_query_ids"] = fed.long()
            tensors[f"turn{i}_answer_ids"] = torch.tensor(answer, dtype=torch.long)
            tensors[f"turn{i}_update_ids"] = rec.update_inputs[0].long()
            tensors[f"turn{i}_stm"] = stm_of(model)
            if i == 1:
                tensors["turn1_step_logits"] = steps.float()

        # 3. STM from text, starting from stm_init
        model.load_stm_state(stm_init.unsqueeze(1).clone())
        if beta_mode:
            enc = model.tokenize_system_prompt(BETA_SYSTEM_PROMPT, max_seq_len=MAX_SEQ_LEN * 2)
            stm_api = "RxTBeta.tokenize_system_prompt(text) then init_stm_state(**ids) (force=False)"
            stm_text: Any = BETA_SYSTEM_PROMPT
        else:
            enc = model.tokenize_full_interaction(*STM_TEXT, max_seq_len=MAX_SEQ_LEN * 2)
            stm_api = "tokenize_full_interaction(query, answer) then init_stm_state(**ids) (force=False)"
            stm_text = list(STM_TEXT)
        model.init_stm_state(**enc)
        tensors["stm_from_text_ids"] = enc["input_ids"].long()
        tensors["stm_from_text"] = stm_of(model)

    # the saved directory alone reproduces the logits in RxLM (from_pretrained + share_components)
    reloaded = cls.from_pretrained(str(case_dir), tokenizer=tok)
    reloaded.share_components()
    reloaded.eval()
    with torch.no_grad():
        reloaded.load_stm_state(stm_init.unsqueeze(1).clone())
        again = reloaded(tensors["prompt_ids"], attention_mask=torch.ones_like(tensors["prompt_ids"]))
    assert torch.equal(again, tensors["prompt_logits"]), "RxLM reload of the saved dir differs"

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(case_dir / "expected.safetensors"))
    shifted = not version.startswith("0.3") or int(version.split(".")[2]) < 91
    quirks = [
        "interact tokenises '[BOS][Q]{query}' with add_special_tokens=False and appends [A] itself",
        (
            "decode steps after the first are fed the last token at current_positions = len(ids so far incl. it),"
            " one more than its index: generated tokens sit one RoPE position later than in a full forward, "
            "and the KV-cache slot at the prompt's end stays empty and masked"
        )
        if shifted
        else "decode steps after the first are fed the last token at current_positions = its index"
        " (len(ids) - 1, since RxLM 0.3.91): the positions of a full forward",
        "memory update encodes query_ids + answer_ids (all sampled tokens, EOS included when produced)",
        "greedy = interact(top_k=1, temperature=1.0): multinomial over a one-hot distribution",
    ]
    if beta_mode and case.thinking_mode == "fast":
        quirks.append(
            "RxTBeta 0.3.x interact(thinking_mode='fast') appends [A] and yields it first; answer_ids omit that echo"
        )
    elif beta_mode:
        quirks.append(
            f"RxTBeta 0.3.x interact(thinking_mode={case.thinking_mode!r}) appends [T] and yields it first;"
            " answer_ids omit that echo (they hold the thinking, any [A] and the answer, as sampled)"
        )
    meta = {
        "rxlm_version": version,
        "class": case.cls,
        "variant": case.variant,
        "options": case.options,
        "queries": QUERIES,
        "prompt": list(PROMPT),
        "max_seq_len": MAX_SEQ_LEN,
        "greedy": "interact(top_k=1, temperature=1.0); checked equal to argmax of the step logits",
        "thinking_mode": case.thinking_mode if beta_mode else None,
        "stm_init_text": stm_text,
        "stm_init_api": stm_api,
        "quirks": quirks,
        "workarounds": workarounds,
        "torch": torch.__version__,
    }
    if case.system_first:  # only these cases carry the key: the others' files stay byte-equal
        meta["system_prompt"] = BETA_SYSTEM_PROMPT
        meta["turns_start"] = "turns_init_stm: stm_init after init_stm_state(**tokenize_system_prompt(system_prompt))"
    (case_dir / "expected.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = (case_dir / "model.safetensors").stat().st_size
    answers = [len(tensors[f"turn{i}_answer_ids"]) for i in (1, 2, 3)]
    print(f"[{version}] {case.name}: model.safetensors {size / 1024:.0f} KB, answers {answers}", flush=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version as dist_version

    import rxlm  # noqa: F401  (fails early outside an RxLM venv)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="root; cases go to OUT/<rxlm-version>/<case>/")
    parser.add_argument("--cases", nargs="*", help="case names to (re)write; default all for this RxLM version")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    version = dist_version("rxlm")
    torch.set_num_threads(1)  # one thread: reductions in one fixed order
    cases = [c for c in CASES if version in c.versions]
    if args.list:
        for c in CASES:
            print(f"{c.name}: {', '.join(c.versions)} {c.options}")
        return 0
    if args.cases:
        unknown = set(args.cases) - {c.name for c in cases}
        if unknown:
            parser.error(f"no such case for rxlm {version}: {sorted(unknown)}")
        cases = [c for c in cases if c.name in args.cases]
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(Path(tmp))
        for case in cases:
            run_case(copy.deepcopy(case), version, tok, Path(tmp) / "tok", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
