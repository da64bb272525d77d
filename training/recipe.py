"""Training recipes are data: one JSON file per recipe, parsed strictly into dataclasses.

A recipe names the model (a preset or a whole config), the data source, the seed and thread
count, and the hyper-parameters of every curriculum stage. Unknown fields are rejected by name and
every value is type-checked, so a typo in a recipe fails loudly instead of silently training
something else. Built-in recipes live in ``training/recipes/*.json`` (installed as
``rxruntime/training/recipes/``); ``load_recipe`` takes one of their names or a path to a JSON file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin

from rxruntime.models.config import SAMPLING_DEFAULTS, RxTConfig, non_default_fields, preset
from rxruntime.models.errors import ConfigError, RxTError

from .backbone import BackboneSpec


class RecipeError(RxTError, ValueError):
    """A recipe is unknown, not valid JSON, or has a field that is unknown or of the wrong type."""


@dataclass
class ModelSpec:
    """A named preset, a whole ``config.json``-style dict, or a pretrained backbone (exactly one)."""

    preset: str | None = None
    config: dict[str, Any] | None = None
    backbone: BackboneSpec | None = None
    """A pretrained backbone with the RxT parts added (``backbone.py``): the recipe skips stages
    0-2 and trains memory only."""
    answer_tokens: int | None = None
    """Written into the model's ``config.json`` (``RxTConfig.answer_tokens``): the answer cap
    serving uses when a turn sets none. Training never reads it."""
    presence_penalty: float = 0.0
    """Written into ``config.json`` too (``RxTConfig.presence_penalty``): serving's default; never
    read by training, so not in the recipe's fingerprint."""
    frequency_penalty: float = 0.0
    """The same for ``RxTConfig.frequency_penalty``."""

    def build(self) -> RxTConfig:
        if sum(x is not None for x in (self.preset, self.config, self.backbone)) != 1:
            raise RecipeError("model: give exactly one of 'preset', 'config' or 'backbone'")
        try:
            if self.backbone is not None:
                config = self.backbone.config()
            elif self.preset is not None:
                config = preset(self.preset)
            else:
                config = RxTConfig.from_dict(dict(self.config or {}))
            # only what the spec sets: a penalty of a ``config`` dict is not reset to the spec's 0
            overrides: dict[str, Any] = {name: getattr(self, name) for name in SAMPLING_DEFAULTS if getattr(self, name)}
            if self.answer_tokens is not None:
                overrides["answer_tokens"] = self.answer_tokens
            return dataclasses.replace(config, **overrides)
        except (ConfigError, RxTError, TypeError) as exc:
            raise RecipeError(f"model: {exc}") from exc


@dataclass
class DataSpec:
    """Where training text comes from. ``synthetic`` is the template generator the nano model was
    trained on (``dialogues.py``); ``people`` the generator of varied, endless facts (``people.py``)."""

    source: Literal["synthetic", "people", "jsonl", "hf"] = "synthetic"
    path: str | None = None
    split: str = "train"
    turns_field: str = "turns"
    query_field: str = "query"
    answer_field: str = "answer"
    text_field: str = "text"
    compound_facts: float = 0.0
    """``people`` only: the share of fact turns that state two facts in one sentence ("I'm Ada and
    I live in Lisbon."), where two are still to be stated (``PeopleGenerator.compound``)."""
    general_questions: float = 0.0
    """Share of the memory-free turns of stage-4 dialogues that are questions to the assistant
    about the world or itself (``PeopleGenerator.general``), answered without the memory."""
    recall_last: float = 0.85
    """Share of stage-4 dialogues whose last question asks about a stated fact; the others ask
    about one never stated (``PeopleGenerator.recall_last``)."""


@dataclass
class TokenizerStage:
    """Stage 0: byte-level BPE (the vocabulary must be >= 263: 256 bytes + 7 special tokens)."""

    vocab_size: int = 1024
    min_frequency: int = 2
    dialogues: int = 20000
    """Synthetic dialogues whose turns form the tokenizer corpus (ignored for file data)."""


@dataclass
class Optim:
    """Steps, batch and AdamW schedule shared by every trained stage (linear warm-up, cosine decay)."""

    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass
class JointStage(Optim):
    """Stages 1-2: decoder AR loss + encoder MLM loss, the decoder reading detached encoder states."""

    ar_weight: float = 1.0
    mlm_weight: float = 1.0
    mask_prob: float = 0.15
    memory_noise: float = 0.1
    """Std of the Gaussian noise added to the detached encoder states, relative to their own std."""
    sentences: int = 3
    """Stage 1 synthetic texts: interactions per plain-text sample."""
    retrieval_share: float = 0.0
    """Stage 2: share of each batch's rows that are retrieval pairs (the encoder reads a fact, the
    decoder writes the question after it; see ``joint.py``). 0 keeps every row a single turn."""


@dataclass
class MemoryPretrainStage(Optim):
    """Stage 3: self-supervised memory attention against a weighted-mean pseudo-label."""

    turns: int = 6
    first_weight: float = 0.9
    weight_start: float = 0.5
    weight_step: float = 0.05
    weight_min: float = 0.05
    weight_jitter: float = 0.15
    noise: float = 0.05
    """Std of the noise added to the input STM and to the label, relative to each one's std."""
    label_pool: Literal["mean", "attention"] = "mean"
    """How ED (T tokens) becomes slot-shaped for the label: its mean, or per-slot soft nearest tokens."""
    pool_sharpness: float = 10.0
    """Inverse temperature of the ``attention`` pooling over cosine similarities."""


@dataclass
class MemoryAwareStage(Optim):
    """Stage 4: decode turn t+1 against the STM written from turns <= t; gradual unfreezing."""

    min_turns: int = 2
    max_turns: int = 10
    ramp_start: int = 0
    """Until this step every dialogue has ``min_turns`` turns (a fact, then its question)."""
    ramp_end: int = 0
    """From ``ramp_start`` to here the longest dialogue grows linearly to ``max_turns``."""
    unfreeze_memory_attention: int = 0
    """Step at which memory attention starts training (the decoder trains from step 0)."""
    unfreeze_encoder: int = 0
    """Step at which the encoder and the shared embedding start training."""
    loss_on: Literal["answer", "all"] = "answer"
    """Which tokens' next-token loss counts: the answer (and [EOS]) only, or the whole interaction."""
    recall_only_until: int = 0
    """Until this step only the answers of questions (stated or never stated) count in the loss:
    acknowledgements and small talk need no memory and would otherwise dominate the early gradient."""
    keep_weight: float = 0.0
    """Backbone recipes: weight of a term that keeps the frozen backbone's own answers where memory
    has nothing to add. On the turns the recall-only rule leaves out (statements, small talk), the
    KL divergence from the backbone's next-token distribution (memory read closed) to the model's,
    at the answer's positions. 0: those turns count for nothing, and the memory read may change
    them freely (the ``smol2`` run did: every answer became a recall answer)."""


@dataclass
class Recipe:
    name: str
    model: ModelSpec
    description: str = ""
    seed: int = 0
    threads: int = 2
    """torch intra-op threads; results are bitwise reproducible for a fixed thread count."""
    isa: Literal["native", "avx2"] = "native"
    """The CPU kernels the run computes with. ``native``: the fastest this CPU has, so the bits
    depend on the machine kind (ATen's AVX-512 kernels round sums differently from its AVX2
    ones). ``avx2``: ATen's AVX2 kernels (``ATEN_CPU_CAPABILITY``), MKL's AVX2 branch of
    conditional numerical reproducibility (``MKL_CBWR``; Intel CPUs: on AMD, MKL runs its own
    AVX2 path either way) and oneDNN up to AVX2, so that machines of different kinds can compute
    the same bits and a run can resume on another one; measured so far on one kind only
    (docs/training.md, "Pinned kernels"; training.trainer.pin_isa)."""
    data: DataSpec = field(default_factory=DataSpec)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    joint_pretrain: JointStage = field(default_factory=JointStage)
    joint_sft: JointStage = field(default_factory=JointStage)
    memory_pretrain: MemoryPretrainStage = field(default_factory=MemoryPretrainStage)
    memory_aware: MemoryAwareStage = field(default_factory=MemoryAwareStage)
    checkpoint_every: int = 500
    """Save a resumable training state every this many steps (and at the end of every stage)."""
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the final model's weights (16-bit keeps the shipped model small)."""
    init_from: str | None = None
    """A model (a shipped model's name or a directory) whose weights start the run instead of
    the seed's draw: a recipe that continues an earlier one. ``init_sha256`` names the weights
    exactly, so a run reproduces only from those (``rxrt train --init-from DIR`` points at a copy
    when the name now holds other weights)."""
    init_sha256: str | None = None
    """SHA-256 of ``init_from``'s ``model.safetensors``; required with it."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        config = self.model.build()
        trains_tokenizer = self.model.backbone is None  # a backbone brings its own: no stage 0
        if trains_tokenizer and self.tokenizer.vocab_size < 263:
            raise RecipeError(f"tokenizer.vocab_size must be >= 263 (byte-level BPE), got {self.tokenizer.vocab_size}")
        if trains_tokenizer and self.tokenizer.vocab_size > config.vocab_size:
            raise RecipeError(
                f"tokenizer.vocab_size={self.tokenizer.vocab_size} exceeds the model's vocab_size={config.vocab_size}"
            )
        if (self.init_from is None) != (self.init_sha256 is None):
            raise RecipeError("init_from and init_sha256 go together: the run must name the weights it starts from")
        if self.init_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.init_sha256):
            raise RecipeError(f"init_sha256 must be 64 lowercase hex digits, got {self.init_sha256!r}")
        if self.threads < 1:
            raise RecipeError(f"threads must be >= 1, got {self.threads}")
        if self.checkpoint_every < 1:
            raise RecipeError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        for name in ("compound_facts", "general_questions", "recall_last"):
            share = getattr(self.data, name)
            if not 0.0 <= share <= 1.0:
                raise RecipeError(f"data.{name} must be in [0, 1], got {share}")
            if share != getattr(DataSpec, name) and self.data.source != "people":
                raise RecipeError(f'data.{name} applies to the people generator (data.source = "people")')
        if self.data.source not in ("synthetic", "people") and not self.data.path:
            raise RecipeError(f"data.path is required for data.source={self.data.source!r}")
        for name in STAGES:
            stage: Optim = getattr(self, name)
            if stage.steps < 0 or stage.batch_size < 1 or stage.lr <= 0 or stage.warmup < 0:
                raise RecipeError(f"{name}: steps >= 0, batch_size >= 1, lr > 0 and warmup >= 0 are required")
        for name in ("joint_pretrain", "joint_sft"):
            share = getattr(self, name).retrieval_share
            if not 0.0 <= share <= 1.0:
                raise RecipeError(f"{name}: retrieval_share must be in [0, 1], got {share}")
        if self.joint_pretrain.retrieval_share:
            raise RecipeError("joint_pretrain: retrieval pairs are a stage 2 option (plain text has no turns)")
        m = self.memory_aware
        if not 2 <= m.min_turns <= m.max_turns:
            raise RecipeError(f"memory_aware: need 2 <= min_turns <= max_turns, got {m.min_turns}, {m.max_turns}")
        if m.keep_weight < 0:
            raise RecipeError(f"memory_aware: keep_weight must be >= 0, got {m.keep_weight}")
        if m.keep_weight > 0 and self.model.backbone is None:
            raise RecipeError("memory_aware: keep_weight needs a backbone recipe (model.backbone)")
        if m.recall_only_until < 0:
            raise RecipeError(f"memory_aware: recall_only_until must be >= 0, got {m.recall_only_until}")
        if not 0 <= m.ramp_start <= m.ramp_end:
            raise RecipeError(f"memory_aware: need 0 <= ramp_start <= ramp_end, got {m.ramp_start}, {m.ramp_end}")
        if self.memory_pretrain.turns < 1:
            raise RecipeError("memory_pretrain.turns must be >= 1")

    def config(self) -> RxTConfig:
        return self.model.build()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the fields away from their defaults: a resumed run must
        use the very same recipe, and a release that adds a recipe field (whose default keeps the
        old behaviour) does not stop runs started before it from resuming."""
        fields = non_default_fields(self, skip=SAMPLING_DEFAULTS)  # serving's defaults: not what a run computes
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


STAGES = ("joint_pretrain", "joint_sft", "memory_pretrain", "memory_aware")
"""The trained stages in curriculum order (stage 0, the tokenizer, comes before them)."""

_T = TypeVar("_T")


def _parse(cls: type[_T], data: Any, where: str) -> _T:
    """Build dataclass ``cls`` from ``data``, checking every field's name and type."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls))}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(where + u for u in unknown)
        raise RecipeError(f"unknown recipe field(s): {names}; known: {', '.join(sorted(fields))}")
    kwargs = {key: _value(hints[key], value, where + key) for key, value in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"missing recipe field(s): {', '.join(where + n for n in missing)}")
    return cls(**kwargs)


def _value(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _parse(cast(Any, hint), value, where + ".")
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        return _value(next(o for o in options if o is not type(None)), value, where)
    if origin is Literal:
        if value not in get_args(hint):
            raise RecipeError(f"{where} must be one of {list(get_args(hint))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be an object, got {type(value).__name__}")
        return value
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a field type this parser does not know is a bug here
        raise TypeError(f"{where}: unsupported field type {hint}")
    if not ok:
        raise RecipeError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    try:
        return _parse(Recipe, data, "")
    except TypeError as exc:  # e.g. a field of the wrong kind deep inside
        raise RecipeError(str(exc)) from exc


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in the package."""
    folder = resources.files("rxruntime.training") / "recipes"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (``nano``, ``ci``) or a recipe JSON file by path."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        source = path.read_text(encoding="utf-8")
    else:
        known = builtin_recipes()
        if text not in known:
            raise RecipeError(f"unknown recipe {text!r}; built-in recipes: {', '.join(known)} (or pass a .json path)")
        source = (resources.files("rxruntime.training") / "recipes" / f"{text}.json").read_text(encoding="utf-8")
        path = Path(f"{text}.json")
    try:
        data = json.loads(source)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return recipe_from_dict(data)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from exc
