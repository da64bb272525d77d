"""The curriculum driver: stage 0 (tokenizer) then stages 1-4, with checkpoints and exact resume.

Output directory layout (``rxrt train --out DIR``)::

    DIR/recipe.json                  the recipe as run
    DIR/tokenizer.json               stage 0
    DIR/stage1-joint-pretrain/ ...   a loadable model directory after each stage (float32)
    DIR/train-state.safetensors      resumable state (every ``checkpoint_every`` steps, each stage end)
    DIR/train-log.jsonl              one line per logged step
    DIR/model/                       the final model, weights in ``save_dtype``
    DIR/summary.json                 seconds and losses per stage, seed, threads, versions

Determinism: the model is initialised from ``torch.manual_seed(seed)``, every step draws its data
and noise from ``step_generators(seed, stage, step)``, torch runs a fixed number of threads with
deterministic algorithms, so the same recipe on the same thread count gives the same weights, and
an interrupted run resumed with ``resume=True`` ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rxruntime.models.checkpoint import load_pretrained, resolve_model_dir, save_pretrained
from rxruntime.models.config import SAMPLING_DEFAULTS
from rxruntime.models.errors import RxTError
from rxruntime.models.rxt import RxTModel
from rxruntime.models.tokenizer import RxTokenizer

from .backbone import SKIPPED_STAGES, frozen_backbone_loss, memory_parameters, set_memory_trainable
from .batches import dialogue_batches, interaction_batch, recall_turns, text_batch
from .joint import joint_loss
from .memory_aware import memory_aware_loss, set_trainable, trainable_groups
from .memory_pretrain import memory_pretrain_loss
from .mlm import MLMHead
from .optim import make_optimizer, optimizer_step, step_generators
from .recipe import STAGES, JointStage, MemoryAwareStage, MemoryPretrainStage, Optim, Recipe
from .sources import Source, make_source
from .state import STATE_FILE, load_state, read_progress, save_state

STAGE_DIRS = {
    "joint_pretrain": "stage1-joint-pretrain",
    "joint_sft": "stage2-joint-sft",
    "memory_pretrain": "stage3-memory-pretrain",
    "memory_aware": "stage4-memory-aware",
}
STAGE_TITLES = {
    "joint_pretrain": "1 joint LM pre-training",
    "joint_sft": "2 joint interaction SFT",
    "memory_pretrain": "3 memory attention pre-training",
    "memory_aware": "4 memory-aware training",
}
LOG_LINES = 50
"""Lines ``train-log.jsonl`` gets per stage (each the mean of the steps since the one before)."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingError(RxTError):
    """The output directory or the state in it does not fit the requested run."""


def configure_torch(threads: int) -> None:
    """Fixed thread count and deterministic kernels: the two things bitwise repeatability needs."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
"""The CPU flags that decide which kernels torch and the C step can pick."""


def cpu_name() -> str:
    """The CPU's model name and its kernel-relevant flags (``/proc/cpuinfo``; elsewhere the
    platform's processor string): "AMD EPYC" alone names both VMs of this project, with and
    without AVX-512."""
    name, flags = "", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    present = [f for f in _FEATURES if f in flags]
    return f"{name} ({' '.join(present)})" if present else name


ISA_ENVIRONMENT = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
"""The environment each ``Recipe.isa`` pin sets (``native`` sets none)."""


def pin_isa(isa: str) -> None:
    """Make this process compute with ``isa``'s kernels (``Recipe.isa``). ATen, MKL and oneDNN read
    these variables when first used, not at import, so setting them here works as long as the
    process has run no tensor work yet; when ATen already chose other kernels, say how to start."""
    wanted = ISA_ENVIRONMENT.get(isa, {})
    for name, value in wanted.items():
        if os.environ.get(name, value) != value:
            raise TrainingError(
                f"the recipe pins isa={isa!r}, which needs {name}={value}; the environment has {os.environ[name]}"
            )
        os.environ[name] = value
    if wanted and torch.backends.cpu.get_cpu_capability() != wanted["ATEN_CPU_CAPABILITY"].upper():
        settings = " ".join(f"{k}={v}" for k, v in wanted.items())
        raise TrainingError(
            f"the recipe pins isa={isa!r}, but this process already runs ATen's "
            f"{torch.backends.cpu.get_cpu_capability()} kernels; start it as: {settings} rxrt train ..."
        )


@dataclass
class StepResult:
    loss: float
    metrics: dict[str, float]


@dataclass
class StageRecord:
    """Per-stage bookkeeping kept in the progress record (so it survives a resume)."""

    seconds: float = 0.0
    steps_done: int = 0
    log: list[dict[str, float]] = field(default_factory=list)
    window: list[dict[str, Any]] = field(default_factory=list)
    """The steps since the last log line (``loss``, ``metrics``): a resume goes on averaging them,
    so its log lines are those of an uninterrupted run."""

    def summary(self) -> dict[str, Any]:
        first, last = (self.log[0], self.log[-1]) if self.log else ({}, {})
        return {"seconds": round(self.seconds, 1), "steps": self.steps_done, "first": first, "last": last}


def curriculum_turns(step: int, stage: MemoryAwareStage, rng_value: float) -> int:
    """Dialogue length at ``step``: uniform in [min_turns, upper] for ``rng_value`` in [0, 1).

    ``upper`` stays at ``min_turns`` until ``ramp_start`` (memory first has to work at all: a fact,
    then its question), then grows linearly to ``max_turns`` at ``ramp_end`` (longer retention).
    """
    span = max(1, stage.ramp_end - stage.ramp_start)
    ramp = min(1.0, max(0.0, (step - stage.ramp_start) / span))
    if step >= stage.ramp_end:
        ramp = 1.0
    upper = stage.min_turns + round((stage.max_turns - stage.min_turns) * ramp)
    return stage.min_turns + int(rng_value * (upper - stage.min_turns + 1))


def _log_line(stage: str, entry: dict[str, Any], steps: int, pace: float) -> str:
    """``memory_aware step 30/300: loss 0.2961, answer_acc 0.9388; 48.2 s/step, about 3h 37m left``."""
    metrics = ", ".join(f"{key} {value:.4f}" for key, value in entry.items() if key != "step")
    left = round(pace * (steps - entry["step"]))
    hours, minutes = divmod(left // 60, 60)
    remaining = f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {left % 60:02d}s"
    return f"{stage} step {entry['step']}/{steps}: {metrics}; {pace:.1f} s/step, about {remaining} left"


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        out: str | Path,
        *,
        resume: bool = False,
        stop_after: int | None = None,
        threads: int | None = None,
        start_from: str | Path | None = None,
        init_from: str | Path | None = None,
        recompute: int = 0,
        progress: Callable[[], AbstractContextManager[Any]] | None = None,
        echo: Callable[[str], None] = lambda _: None,
        lines: Callable[[str], None] | None = None,
    ) -> None:
        self.recipe = recipe
        self.out = Path(out)
        self.resume = resume
        self.stop_after = stop_after
        self.start_from = Path(start_from) if start_from is not None else None
        self.started_from: str | None = None
        self.init_from = init_from if init_from is not None else recipe.init_from
        """Where the recipe's starting weights are read (``--init-from`` overrides the recipe's)."""
        if init_from is not None and recipe.init_from is None:
            raise TrainingError(f"--init-from {init_from}: recipe {recipe.name!r} starts from no model (init_from)")
        self.threads = threads or recipe.threads
        if recompute < 0:
            raise TrainingError(f"recompute takes a number of turns >= 1 (0: never), got {recompute}")
        self.recompute = int(recompute)
        """Backbone recipes: recompute each turn in the backward pass (same weights, less memory) in the
        steps whose dialogues have at least this many turns; 0 never, 1 (True) every step."""
        self.make_progress = progress
        self.echo = echo
        self.lines = lines
        """Told one plain line per log line (step, loss, pace, time left): the progress a run
        gets where no bar can be drawn (its output in a file, under nohup)."""
        self.config = recipe.config()
        self.records: dict[str, StageRecord] = {name: StageRecord() for name in STAGES}
        self.completed: list[str] = []
        self.steps_this_run = 0
        self.tokenizer_seconds = 0.0
        self.machines: list[dict[str, str]] = [{"cpu": cpu_name(), "capability": "", "from": "start"}]
        """The CPUs the run has computed on (a resumed run may change machine) and ATen's kernels there."""

    # ------------------------------------------------------------------ entry point
    def run(self) -> bool:
        """Run (or continue) the curriculum. False if ``stop_after`` interrupted it, True when done.

        torch's thread count and determinism flag are restored afterwards (they are process-global).
        """
        pin_isa(self.recipe.isa)
        self.machines[-1]["capability"] = torch.backends.cpu.get_cpu_capability()
        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        configure_torch(self.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)

    def _run(self) -> bool:
        self._prepare_out()
        self.source: Source = make_source(
            self.recipe.data, self.recipe.seed, self.recipe.tokenizer.dialogues, self.recipe.joint_pretrain.sentences
        )
        resuming = self.resume and (self.out / STATE_FILE).exists()
        backbone = self.recipe.model.backbone
        if backbone is not None:  # a pretrained model: its tokenizer, no stages 0-2 (backbone.py)
            self.model, self.tokenizer = self._backbone_model()
            self.tokenizer.save(self.out / "tokenizer.json")
            self.completed = list(SKIPPED_STAGES)
        elif self.start_from is not None and not resuming:
            self.tokenizer = self._tokenizer_from(self.start_from)
        else:
            self.tokenizer = self._tokenizer()
        if backbone is None:
            torch.manual_seed(self.recipe.seed)
            self.model = RxTModel(self.config)
        self.head = MLMHead(self.config)
        self.model.train()
        start: dict[str, Any] = {}
        optimizer_state = None
        if self.init_from is not None and not resuming:
            self._init_weights(self.init_from)
        if self.start_from is not None and not resuming:
            self._weights_from(self.start_from)
        if resuming:
            progress, optimizer_state = load_state(self.out / STATE_FILE, self.model, self.head)
            self._restore(progress)
            self._rewrite_log()
            start = {"stage": progress.get("stage"), "step": progress.get("step", 0)}
            self.echo(f"resuming at {start['stage']} step {start['step']}")
        context = self.make_progress() if self.make_progress else nullcontext(None)
        with context as bar:
            for name in STAGES:
                if name in self.completed:
                    continue
                first = start.get("step", 0) if start.get("stage") == name else 0
                state = optimizer_state if start.get("stage") == name else None
                if not self._stage(name, first, state, bar):
                    return False
        self._finish()
        return True

    def _backbone_model(self) -> tuple[RxTModel, RxTokenizer]:
        """A backbone recipe's model before training, with the recipe's serving defaults (answer
        cap, penalties) in its config, so the saved config.json has them as a model built from
        the recipe's config does."""
        backbone = self.recipe.model.backbone
        assert backbone is not None
        model, tokenizer = backbone.build(self.recipe.seed)
        serving = {name: getattr(self.config, name) for name in ("answer_tokens", *SAMPLING_DEFAULTS)}
        model.config = dataclasses.replace(model.config, **serving)
        return model, tokenizer

    # ------------------------------------------------------------------ a run's state as a model
    def export(self, destination: str | Path) -> dict[str, Any]:
        """Write the run's newest saved state as a model directory, as the finished run writes
        ``OUT/model`` (the recipe's ``save_dtype``, its serving defaults): a run can be probed
        mid-way (``rxrt eval memory``, ``rxrt chat``) without stopping it. Returns the state's
        progress record (``stage``, ``step``)."""
        state = self.out / STATE_FILE
        progress = read_progress(state)
        if progress.get("recipe") != self.recipe.fingerprint():
            raise TrainingError(f"{state}: was written by a different recipe; --export needs the run's own")
        destination = Path(destination)
        if destination.resolve() == (self.out / "model").resolve():
            raise TrainingError(f"--export {destination}: that is where the finished run writes its model")
        if self.recipe.model.backbone is not None:
            model, tokenizer = self._backbone_model()
        else:
            model = RxTModel(self.config)  # every tensor the state holds is then read from it
            tokenizer = RxTokenizer.from_file(self.out / "tokenizer.json")
        load_state(state, model, MLMHead(self.config))
        save_pretrained(model, destination, tokenizer=tokenizer, dtype=_DTYPES[self.recipe.save_dtype])
        return progress

    # ------------------------------------------------------------------ setup
    def _prepare_out(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        recipe_file = self.out / "recipe.json"
        state = self.out / STATE_FILE
        if state.exists() and not self.resume:
            raise TrainingError(f"{self.out} already holds a training run; pass --resume or choose another --out")
        if self.resume and state.exists():
            fingerprint = read_progress(state).get("recipe")
            if fingerprint != self.recipe.fingerprint():
                raise TrainingError(f"{state}: was written by a different recipe; resume needs the same one")
        recipe_file.write_text(json.dumps(self.recipe.to_dict(), indent=2) + "\n", encoding="utf-8")

    def _tokenizer(self) -> RxTokenizer:
        path = self.out / "tokenizer.json"
        if self.resume and path.exists():
            return RxTokenizer.from_file(path)
        t0 = time.perf_counter()
        tok = RxTokenizer.train(
            self.source.tokenizer_texts(), self.recipe.tokenizer.vocab_size, self.recipe.tokenizer.min_frequency
        )
        tok.save(path)
        self.tokenizer_seconds = time.perf_counter() - t0
        self.echo(f"stage 0 tokenizer: {tok.vocab_size} tokens in {self.tokenizer_seconds:.1f}s")
        return tok

    def _start_stage(self, directory: Path) -> str:
        """The stage whose output ``directory`` is (``RUN/stage3-memory-pretrain`` -> ``memory_pretrain``)."""
        by_dir = {d: name for name, d in STAGE_DIRS.items()}
        if directory.name not in by_dir:
            raise TrainingError(f"--start-from {directory}: not a stage directory ({', '.join(STAGE_DIRS.values())})")
        if not directory.is_dir():
            raise TrainingError(f"--start-from {directory}: no such directory")
        return by_dir[directory.name]

    def _tokenizer_from(self, directory: Path) -> RxTokenizer:
        """A run started from another run's stage keeps that run's tokenizer (its embedding rows fit it)."""
        self._start_stage(directory)
        tok = RxTokenizer.from_file(directory / "tokenizer.json")
        if tok.vocab_size != self.recipe.tokenizer.vocab_size:
            raise TrainingError(
                f"--start-from {directory}: its tokenizer has {tok.vocab_size} tokens, the recipe asks for "
                f"{self.recipe.tokenizer.vocab_size}"
            )
        tok.save(self.out / "tokenizer.json")
        return tok

    def _weights_from(self, directory: Path) -> None:
        """Pilots of later stages: take the weights of an earlier run's stage and skip it and the ones before.

        The MLM head is not in a stage directory, so stages 1-2, if any are left, restart it.
        """
        stage = self._start_stage(directory)
        loaded, _ = load_pretrained(directory, load_tokenizer=False)
        if loaded.config.to_dict() != self.config.to_dict():
            raise TrainingError(f"--start-from {directory}: its model config differs from the recipe's")
        self.model.load_state_dict(loaded.state_dict())
        self.completed = list(STAGES[: STAGES.index(stage) + 1])
        self.started_from = str(directory)
        self.echo(f"starting from {directory}: stages {', '.join(self.completed)} skipped")

    def _init_weights(self, source: str | Path) -> None:
        """The recipe's ``init_from``: every tensor of the model from that model's weights, which
        must be exactly the ones ``init_sha256`` names (a continued recipe reproduces only from them)."""
        directory = resolve_model_dir(source)
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise TrainingError(f"init_from {source}: no model.safetensors in {directory}")
        digest = hashlib.sha256()
        with weights.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != self.recipe.init_sha256:
            raise TrainingError(
                f"init_from {source}: {weights} has SHA-256 {digest.hexdigest()}, the recipe starts from "
                f"{self.recipe.init_sha256}; point --init-from at a directory holding those weights "
                "(a shipped model replaced since is in the repository's history)"
            )
        loaded, _ = load_pretrained(directory, load_tokenizer=False)
        own, theirs = self.model.state_dict(), loaded.state_dict()
        if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
            raise TrainingError(f"init_from {source}: its tensors are not this recipe's model's")
        self.model.load_state_dict({k: v.to(own[k].dtype) for k, v in theirs.items()})
        self.echo(f"starting from the weights of {directory} (SHA-256 {digest.hexdigest()[:12]}...)")

    def _restore(self, progress: dict[str, Any]) -> None:
        self.started_from = progress.get("started_from")
        self.completed = list(progress.get("completed", []))
        self.tokenizer_seconds = float(progress.get("tokenizer_seconds", 0.0))
        for name, rec in progress.get("records", {}).items():
            self.records[name] = StageRecord(rec["seconds"], rec["steps_done"], rec["log"], rec.get("window", []))
        here, before = self.machines[-1], list(progress.get("machines", []))
        if before and before[-1]["capability"] != here["capability"] and self.recipe.isa == "native":
            self.echo(
                f"[yellow]resuming with ATen's {here['capability']} kernels where the run so far used "
                f"{before[-1]['capability']}: its weights will not be those of an uninterrupted run "
                "(a recipe with isa 'avx2' pins ATen's kernels)"
            )
        if before and (before[-1]["cpu"], before[-1]["capability"]) == (here["cpu"], here["capability"]):
            self.machines = before  # the same kind of machine goes on: its entry stands
        else:
            self.machines = [*before, {**here, "from": f"{progress.get('stage')} step {progress.get('step', 0)}"}]

    def _rewrite_log(self) -> None:
        """``train-log.jsonl`` as of the state resumed from: the lines a stopped process logged
        after its last checkpoint are dropped (the resumed run logs those steps again)."""
        lines = [json.dumps({"stage": name, **entry}) + "\n" for name in STAGES for entry in self.records[name].log]
        path = self.out / "train-log.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, path)

    def _progress(self, stage: str, step: int) -> dict[str, Any]:
        return {
            "recipe": self.recipe.fingerprint(),
            "stage": stage,
            "step": step,
            "completed": self.completed,
            "started_from": self.started_from,
            "threads": self.threads,
            "tokenizer_seconds": self.tokenizer_seconds,
            "records": {n: vars(r) for n, r in self.records.items()},
            "machines": self.machines,
        }

    # ------------------------------------------------------------------ one stage
    def _parameters(self, name: str) -> list[nn.Parameter]:
        if name == "memory_pretrain":
            return list(self.model.memory_attention.parameters())
        if name == "memory_aware":
            if self.recipe.model.backbone is not None:
                return memory_parameters(self.model)
            return list(self.model.parameters())
        return [*self.model.parameters(), *self.head.parameters()]

    def _stage(self, name: str, first: int, optimizer_state: dict[str, Any] | None, bar: Any) -> bool:
        cfg: Optim = getattr(self.recipe, name)
        record = self.records[name]
        self.model.requires_grad_(True)
        optimizer = make_optimizer(self._parameters(name), cfg)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        task = None
        if bar is not None:
            task = bar.add_task(STAGE_TITLES[name], total=cfg.steps, completed=first, loss=float("nan"))
        log_every = max(1, cfg.steps // LOG_LINES)
        if first == 0:
            record.window = []
        log_file = self.out / "train-log.jsonl"
        t0 = time.perf_counter()
        paced_from, paced_steps = t0, 0  # this process's steps since the last log line
        for step in range(first, cfg.steps):
            if self.stop_after is not None and self.steps_this_run >= self.stop_after:
                record.seconds += time.perf_counter() - t0
                save_state(self.out / STATE_FILE, self.model, self.head, optimizer, self._progress(name, step))
                self.echo(f"stopped after {self.steps_this_run} steps at {name} step {step}; continue with --resume")
                return False
            result = self._step(name, step, optimizer)
            self.steps_this_run += 1
            paced_steps += 1
            record.steps_done = step + 1
            record.window.append({"loss": result.loss, "metrics": result.metrics})
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                window = record.window
                entry = {"step": step + 1, "loss": _mean([r["loss"] for r in window])}
                for key in window[-1]["metrics"]:
                    entry[key] = _mean([r["metrics"][key] for r in window])
                record.log.append(entry)
                with log_file.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"stage": name, **entry}) + "\n")
                record.window = []
                if self.lines is not None:
                    pace = (time.perf_counter() - paced_from) / paced_steps
                    self.lines(_log_line(name, entry, cfg.steps, pace))
                paced_from, paced_steps = time.perf_counter(), 0
            if bar is not None:
                bar.update(task, completed=step + 1, loss=result.loss)
            if (step + 1) % self.recipe.checkpoint_every == 0 and step + 1 < cfg.steps:
                record.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_state(self.out / STATE_FILE, self.model, self.head, optimizer, self._progress(name, step + 1))
        record.seconds += time.perf_counter() - t0
        self.model.requires_grad_(True)
        self.completed.append(name)
        save_pretrained(self.model, self.out / STAGE_DIRS[name], tokenizer=self.tokenizer)
        save_state(self.out / STATE_FILE, self.model, self.head, None, self._progress(name, cfg.steps))
        last = record.log[-1] if record.log else {}
        self.echo(f"stage {STAGE_TITLES[name]}: {record.seconds:.0f}s, last {json.dumps(last)}")
        return True

    def _step(self, name: str, step: int, optimizer: torch.optim.Optimizer) -> StepResult:
        rng, gen = step_generators(self.recipe.seed, name, step)
        max_len = self.config.max_seq_len
        tok = self.tokenizer
        if name in ("joint_pretrain", "joint_sft"):
            cfg_j: JointStage = getattr(self.recipe, name)
            encoder_batch = None
            if name == "joint_pretrain":
                batch = text_batch(tok, self.source.texts(rng, cfg_j.batch_size), max_len)
            elif cfg_j.retrieval_share > 0:
                pairs = round(cfg_j.batch_size * cfg_j.retrieval_share)
                single = self.source.interactions(rng, cfg_j.batch_size - pairs)
                facts_then_questions = self.source.dialogues(rng, pairs, 2) if pairs else []
                batch = interaction_batch(tok, [*single, *(d.turns[1] for d in facts_then_questions)], max_len)
                read = [*single, *(d.turns[0] for d in facts_then_questions)]
                encoder_batch = interaction_batch(tok, read, max_len)
            else:
                batch = interaction_batch(tok, self.source.interactions(rng, cfg_j.batch_size), max_len)
            out = joint_loss(self.model, self.head, batch, cfg_j, tok.vocab_size, gen, encoder_batch)
            optimizer_step(optimizer, out.total, step, cfg_j)
            return StepResult(out.total.item(), {"ar": out.ar, "mlm": out.mlm, "ar_acc": out.ar_accuracy})
        if name == "memory_pretrain":
            cfg_m: MemoryPretrainStage = self.recipe.memory_pretrain
            dialogues = self.source.dialogues(rng, cfg_m.batch_size, max(2, cfg_m.turns))
            turns, _ = dialogue_batches(tok, dialogues, max_len)
            loss, per_turn = memory_pretrain_loss(self.model, turns[: cfg_m.turns], cfg_m, rng, gen)
            optimizer_step(optimizer, loss, step, cfg_m)
            return StepResult(loss.item(), {"first_turn": per_turn[0], "last_turn": per_turn[-1]})
        cfg_a: MemoryAwareStage = self.recipe.memory_aware
        frozen = self.recipe.model.backbone is not None
        (set_memory_trainable if frozen else set_trainable)(self.model, trainable_groups(step, cfg_a))
        n_turns = curriculum_turns(step, cfg_a, rng.random())
        dialogues = self.source.dialogues(rng, cfg_a.batch_size, n_turns)
        turns, present = dialogue_batches(tok, dialogues, max_len, answer_only=cfg_a.loss_on == "answer")
        keep = None
        if step < cfg_a.recall_only_until:
            recall = recall_turns(dialogues)
            keep = present & ~recall  # the turns left out: the backbone's own answers (keep_weight)
            present = present & recall
        if frozen:
            recompute = 0 < self.recompute <= n_turns
            loss, per_turn, accuracy = frozen_backbone_loss(
                self.model, turns, present, gen, keep=keep, keep_weight=cfg_a.keep_weight, recompute=recompute
            )
        else:
            loss, per_turn, accuracy = memory_aware_loss(self.model, turns, present, gen)
        optimizer_step(optimizer, loss, step, cfg_a)
        return StepResult(loss.item(), {"per_turn": _mean(per_turn), "answer_acc": accuracy, "turns": n_turns})

    # ------------------------------------------------------------------ the end
    def _finish(self) -> None:
        final = self.out / "model"
        save_pretrained(self.model, final, tokenizer=self.tokenizer, dtype=_DTYPES[self.recipe.save_dtype])
        total = self.tokenizer_seconds + sum(r.seconds for r in self.records.values())
        summary = {
            "recipe": self.recipe.name,
            "fingerprint": self.recipe.fingerprint(),
            "seed": self.recipe.seed,
            "started_from": self.started_from,
            "threads": self.threads,
            "isa": self.recipe.isa,
            "machines": self.machines,
            "torch": torch.__version__,
            "faker": _faker_version() if self.recipe.data.source == "people" else None,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "tokenizer": {"seconds": round(self.tokenizer_seconds, 1), "vocab_size": self.tokenizer.vocab_size},
            "stages": {name: self.records[name].summary() for name in STAGES},
            "total_seconds": round(total, 1),
            "model": str(final),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.echo(f"done in {total / 60:.1f} min; model in {final}")


def _faker_version() -> str:
    """The people generator's values come from Faker, whose data change between versions."""
    from importlib.metadata import version

    return version("faker")


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
