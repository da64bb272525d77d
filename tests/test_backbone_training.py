"""Memory training around a frozen backbone (``training/backbone.py``, recipe ``smol-ci``).

The tiny random backbone of SmolLM2's shape family stands in for the 98 MB file: the pipeline is
the same, only the sizes differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rxruntime.cli import main
from rxruntime.models import load_pretrained
from rxruntime.models.checkpoint import load_weights
from rxruntime.models.rxt import RxTModel
from rxruntime.models.tokenizer import RxTokenizer
from rxruntime.training import trainer as trainer_module
from rxruntime.training.backbone import (
    BackboneSpec,
    frozen_backbone_loss,
    keep_loss,
    memory_parameter_names,
    memory_parameters,
    set_memory_trainable,
)
from rxruntime.training.batches import TokenBatch, dialogue_batches
from rxruntime.training.memory_aware import memory_aware_loss
from rxruntime.training.recipe import RecipeError, load_recipe, recipe_from_dict
from rxruntime.training.sources import PeopleSource

pytest.importorskip("gguf")
pytest.importorskip("faker")


@pytest.fixture(scope="module")
def tiny() -> tuple[RxTModel, RxTokenizer]:
    return BackboneSpec(source="tiny", memory_layers=2, memory_start=1, stm_size=8, max_seq_len=160).build(seed=5)


def _turns(tok: RxTokenizer, n: int = 3) -> tuple[list[TokenBatch], torch.Tensor]:
    dialogues = PeopleSource(11, 10).dialogues(random.Random(3), 4, n)
    return dialogue_batches(tok, dialogues, 160)


def test_cheap_loss_equals_plain_loss_and_gradients(tiny: tuple[RxTModel, RxTokenizer]) -> None:
    """Frozen prefix without a graph, LM head at answer tokens only: the same value and gradients
    as ``memory_aware_loss`` (full logits everywhere), once the memory gate is open."""
    model, tok = tiny
    with torch.no_grad():  # open the gates, or the decoder's memory parameters would get no gradient
        for block in model.decoder.blocks:
            if block.cross_attn is not None:
                block.cross_attn.o_proj.weight.normal_(0.0, 0.05)
    turns, present = _turns(tok)
    set_memory_trainable(model, ("decoder", "memory_attention", "encoder"))
    results = []
    for loss_fn in (memory_aware_loss, frozen_backbone_loss):
        model.zero_grad(set_to_none=True)
        loss, per_turn, accuracy = loss_fn(model, turns, present, torch.Generator().manual_seed(0))
        torch.autograd.backward(loss)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), per_turn, accuracy, grads))
    (l1, t1, a1, g1), (l2, t2, a2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5)
    assert t1 == pytest.approx(t2, rel=1e-5) and a1 == a2
    assert g1.keys() == g2.keys() == {n for group in memory_parameter_names(model).values() for n in group}
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-3, msg=name)


def test_backbone_never_trains(tiny: tuple[RxTModel, RxTokenizer]) -> None:
    model, _ = tiny
    groups = memory_parameter_names(model)
    assert groups["decoder"] and all(".cross_" in n or ".stm_norm" in n for n in groups["decoder"])
    set_memory_trainable(model, ("decoder",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(groups["decoder"])
    set_memory_trainable(model, ("decoder", "memory_attention", "encoder"))
    assert not model.embedding.weight.requires_grad and not model.decoder.lm_head.weight.requires_grad
    assert len(memory_parameters(model)) == sum(len(v) for v in groups.values())
    with pytest.raises(ValueError, match="unknown component"):
        set_memory_trainable(model, ("backbone",))


def test_recipe_needs_exactly_one_model_source() -> None:
    spec = load_recipe("smol-ci").to_dict()
    spec["model"]["preset"] = "nano"
    with pytest.raises(RecipeError, match="exactly one"):
        recipe_from_dict(spec)
    spec = load_recipe("smol-ci").to_dict()
    spec["model"]["backbone"]["memory_layerz"] = 3
    with pytest.raises(RecipeError, match="memory_layerz"):
        recipe_from_dict(spec)
    spec = load_recipe("smol-ci").to_dict()
    spec["model"]["backbone"]["memory_layers"] = 9
    with pytest.raises(RecipeError, match="memory_layers"):
        recipe_from_dict(spec)


@pytest.fixture(scope="module")
def smol_ci_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smol-ci")
    assert main(["train", "--recipe", "smol-ci", "--out", str(out), "--quiet"]) == 0
    return out


def test_smol_ci_trains_memory_only(smol_ci_run: Path) -> None:
    out = smol_ci_run
    assert not (out / "stage1-joint-pretrain").exists() and not (out / "stage2-joint-sft").exists()
    model, tok = load_pretrained(out / "model")
    assert tok is not None and model.config.interaction_template == "chatml"
    fresh, _ = load_recipe("smol-ci").model.backbone.build(seed=7)  # type: ignore[union-attr]
    trained = dict(model.named_parameters())
    groups = memory_parameter_names(model)
    memory = {n for g in groups.values() for n in g}
    for name, p in fresh.named_parameters():
        same = torch.equal(p, trained[name])
        if name in memory:
            continue
        assert same, f"backbone parameter {name} changed"
    changed = [n for n in memory if not torch.equal(dict(fresh.named_parameters())[n], trained[n])]
    assert any(n.startswith("decoder.") for n in changed)
    assert any(n.startswith("encoder.") for n in changed)
    assert any(n.startswith("memory_attention.") for n in changed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["joint_pretrain"]["steps"] == 0
    assert summary["stages"]["memory_aware"]["steps"] == 8


def test_smol_ci_resumes_bit_for_bit(smol_ci_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    # 6 steps: stops inside stage 4 (after 4 steps of stage 3), between two periodic checkpoints
    assert main(["train", "--recipe", "smol-ci", "--out", str(out), "--quiet", "--stop-after", "6"]) == 3
    assert main(["train", "--recipe", "smol-ci", "--out", str(out), "--quiet", "--resume"]) == 0
    for name in ("stage3-memory-pretrain", "stage4-memory-aware", "model"):
        a = load_weights(smol_ci_run / name / "model.safetensors")
        b = load_weights(out / name / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"


def test_export_of_a_backbone_run_is_its_model(smol_ci_run: Path, tmp_path: Path) -> None:
    """``rxrt train --export`` on a backbone recipe builds the model around the backbone, reads the
    run's state into it, and writes what the finished run wrote: the same tensors and config."""
    assert main(["train", "--recipe", "smol-ci", "--out", str(smol_ci_run), "--export", str(tmp_path / "m")]) == 0
    a = load_weights(smol_ci_run / "model" / "model.safetensors")
    b = load_weights(tmp_path / "m" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config == json.loads((smol_ci_run / "model" / "config.json").read_text())


def test_eval_plays_the_chat_template(smol_ci_run: Path) -> None:
    """``rxrt eval memory``'s player prompts a chatml model with its chat template."""
    from rxruntime.models.generation import generate
    from rxruntime.training.mrqbench import run_dialogues

    model, tok = load_pretrained(smol_ci_run / "model")
    assert tok is not None
    dialogues = PeopleSource(5, 10).dialogues(random.Random(1), 3, 2)
    answers = run_dialogues(model, tok, dialogues, reset_memory=False, seed=4, max_new_tokens=8)
    stm = model.init_stm(3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first = generate(model, stm, [tok.query_ids(d.turns[0].query) for d in dialogues], max_new_tokens=8)
    assert [a[0] for a in answers] == [tok.decode(ids) for ids in first]
    assert main(["eval", "memory", "--model", str(smol_ci_run / "model"), "--dialogues", "2", "--max-gap", "1",
                 "--splits", "in_domain", "--json"]) == 0  # fmt: skip


def test_copy_select_recipe_trains_reads_and_writes_only(tmp_path: Path) -> None:
    """The ``smol2`` start (copied memory read, selecting write, causal encoder) through ``rxrt
    train``: stage 3 skipped, the encoder never unfrozen, so it stays the backbone's blocks; the
    memory read and write train."""
    spec = load_recipe("smol-ci").to_dict()
    spec["name"] = "smol2-ci"
    spec["model"]["backbone"].update(
        encoder_causal=True, memory_read="copy", read_scale=0.1, memory_write="select", write_sharpness=4.0
    )
    spec["memory_pretrain"]["steps"] = 0
    spec["memory_aware"].update(
        steps=4, unfreeze_memory_attention=0, unfreeze_encoder=1000, recall_only_until=1000, keep_weight=1.0
    )
    recipe_file = tmp_path / "smol2-ci.json"
    recipe_file.write_text(json.dumps(spec), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--quiet"]) == 0
    model, _ = load_pretrained(out / "model")
    assert model.config.encoder.causal
    fresh, _ = recipe_from_dict(spec).model.backbone.build(seed=7)  # type: ignore[union-attr]
    before = dict(fresh.named_parameters())
    after = dict(model.named_parameters())
    encoder = [n for n in after if n.startswith("encoder.")]
    assert encoder and all(torch.equal(before[n], after[n]) for n in encoder)
    for part in ("decoder.layers.1.cross_attn.o_proj.weight", "memory_attention.attention.0.k_proj.weight"):
        assert not torch.equal(before[part], after[part]), part
    assert json.loads((out / "summary.json").read_text())["stages"]["memory_pretrain"]["steps"] == 0


def test_keep_loss_is_zero_for_the_backbone_and_grows_with_the_memory_read() -> None:
    """``keep_loss`` compares with the backbone's own distribution (memory read closed): a model
    whose read adds nothing scores 0 whatever the STM; an open read scores > 0 and gets gradients."""
    model, tok = BackboneSpec(source="tiny", memory_layers=2, memory_start=1, stm_size=8, max_seq_len=160).build(5)
    turns, _ = _turns(tok, 2)
    keep = torch.ones(turns[0].size, dtype=torch.bool)
    stm = model.init_stm(turns[0].size, generator=torch.Generator().manual_seed(1), std=1.0)
    with torch.no_grad():
        assert float(keep_loss(model, turns[0], keep, stm)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for block in model.decoder.blocks:
            if block.cross_attn is not None:
                block.cross_attn.o_proj.weight.normal_(0.0, 0.5)
    loss = keep_loss(model, turns[0], keep, stm)
    assert float(loss.detach()) > 1e-3
    torch.autograd.backward(loss)
    grad = model.decoder.blocks[1].cross_attn.o_proj.weight.grad  # type: ignore[union-attr]
    assert grad is not None and float(grad.abs().sum()) > 0
    # rows outside ``keep`` count for nothing
    none = torch.zeros_like(keep)
    none[0] = True
    with torch.no_grad():
        one_row = float(keep_loss(model, turns[0], none, stm))
    assert one_row != pytest.approx(float(loss.detach()), rel=1e-3)


def test_keep_weight_is_checked() -> None:
    spec = load_recipe("smol-ci").to_dict()
    spec["memory_aware"]["keep_weight"] = -1.0
    with pytest.raises(RecipeError, match="keep_weight"):
        recipe_from_dict(spec)
    plain = load_recipe("ci").to_dict()
    plain["memory_aware"]["keep_weight"] = 0.5
    with pytest.raises(RecipeError, match="backbone"):
        recipe_from_dict(plain)


def _smol3_shape(tmp_path: Path, name: str, memory_aware: dict[str, Any], **fields: Any) -> tuple[Path, dict[str, Any]]:
    """smol3's recipe on the tiny backbone (3 memory layers, one thread, batches of 4, float32
    weights saved), ``memory_aware`` and ``fields`` over it; written to ``tmp_path``."""
    recipes = Path(__file__).parents[1] / "training" / "recipes"
    recipe = json.loads((recipes / "smol3.json").read_text())
    tiny = json.loads((recipes / "smol-ci.json").read_text())
    backbone = {**recipe["model"]["backbone"], **tiny["model"]["backbone"], "memory_layers": 3}
    stage = {**recipe["memory_aware"], "batch_size": 4, "warmup": 1, **memory_aware}
    shaped = {**recipe, "name": name, "threads": 1, "model": {"backbone": backbone}, "memory_aware": stage,
              "save_dtype": "float32", **fields}  # fmt: skip
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(shaped))
    return path, shaped


def test_recompute_from_a_number_of_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--recompute 3`` recomputes the steps whose dialogues have 3 turns or more and keeps the
    activations of shorter ones (which fit in memory anyway): the same weights as no recomputing."""
    path, _ = _smol3_shape(tmp_path, "smol3-recompute-from", {"steps": 6, "ramp_end": 2})
    seen: list[tuple[int, bool]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:  # (model, turns, ...), recompute=...
        seen.append((len(args[1]), kwargs["recompute"]))
        return frozen_backbone_loss(*args, **kwargs)

    plain, split = tmp_path / "plain", tmp_path / "split"
    assert main(["train", "--recipe", str(path), "--out", str(plain), "--quiet"]) == 0
    monkeypatch.setattr(trainer_module, "frozen_backbone_loss", spy)
    assert main(["train", "--recipe", str(path), "--out", str(split), "--quiet", "--recompute", "3"]) == 0
    assert min(n for n, _ in seen) < 3 <= max(n for n, _ in seen), seen  # both kinds of step
    assert all(recompute == (n >= 3) for n, recompute in seen), seen
    a = load_weights(plain / "model" / "model.safetensors")
    b = load_weights(split / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "recomputing changed the weights"
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "x"), "--quiet", "--recompute", "-1"]) == 2


def test_shipped_recipe_shape_resumes_bit_for_bit(tmp_path: Path) -> None:
    """The options the shipped SmolLM2 recipe uses (copied memory read, causal frozen encoder,
    selecting write, stage 3 skipped, recall-only loss with the keep term, the turn ramp) on the
    tiny backbone: stopped between checkpoints and resumed, the run ends with the same weights as
    one that never stopped. ``smol-ci`` covers the first recipe's options; this one smol3's."""
    path, shaped = _smol3_shape(tmp_path, "smol3-shape", {"steps": 7, "ramp_end": 4}, checkpoint_every=3)
    assert shaped["memory_aware"]["keep_weight"] > 0 and shaped["model"]["backbone"]["memory_read"] == "copy"
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", "--recipe", str(path), "--out", str(whole), "--quiet"]) == 0
    assert main(["train", "--recipe", str(path), "--out", str(split), "--quiet", "--stop-after", "4"]) == 3
    assert main(["train", "--recipe", str(path), "--out", str(split), "--quiet", "--resume"]) == 0
    a = load_weights(whole / "model" / "model.safetensors")
    b = load_weights(split / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs"


def _continued(smol_ci_run: Path, tmp_path: Path, **changes: Any) -> Path:
    """smol-ci continued from its own finished run (``init_from``, pinned by the weights' SHA-256)."""
    weights = smol_ci_run / "model" / "model.safetensors"
    spec = load_recipe("smol-ci").to_dict()
    spec.update(name="smol-ci-continued", init_from=str(smol_ci_run / "model"))
    spec["init_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    spec["memory_pretrain"]["steps"] = 0
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    path = tmp_path / f"continued-{len(list(tmp_path.glob('continued-*')))}.json"
    path.write_text(json.dumps(spec))
    return path


def test_a_continued_recipe_starts_from_exactly_the_weights_it_names(
    smol_ci_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``init_from``: with no step to take, the run's model is the named model, tensor for tensor;
    weights whose SHA-256 is not the recipe's are refused, and ``--init-from`` reads a copy."""
    recipe = _continued(smol_ci_run, tmp_path, memory_aware={"steps": 0})
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    start, end = (load_weights(p / "model.safetensors") for p in (smol_ci_run / "model", tmp_path / "run" / "model"))
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["isa"] == "native" and summary["machines"][0]["capability"]
    copy = tmp_path / "copy"
    shutil.copytree(smol_ci_run / "model", copy)
    out = tmp_path / "from-copy"
    assert main(["train", "--recipe", str(recipe), "--out", str(out), "--quiet", "--init-from", str(copy)]) == 0
    assert torch.equal(load_weights(out / "model" / "model.safetensors")[next(iter(start))], start[next(iter(start))])
    other = _continued(smol_ci_run, tmp_path, memory_aware={"steps": 0}, init_sha256="0" * 64)
    capsys.readouterr()
    assert main(["train", "--recipe", str(other), "--out", str(tmp_path / "refused"), "--quiet"]) != 0
    assert "has SHA-256" in capsys.readouterr().err and not (tmp_path / "refused" / "model").exists()
    spec = json.loads(recipe.read_text())
    with pytest.raises(RecipeError, match="init_sha256"):
        recipe_from_dict({**spec, "init_sha256": None})
    with pytest.raises(RecipeError, match="64 lowercase hex"):
        recipe_from_dict({**spec, "init_sha256": "abc"})


def test_a_pinned_continued_recipe_resumes_bit_for_bit(smol_ci_run: Path, tmp_path: Path) -> None:
    """smol4's options on the tiny backbone (continued from a run, ``isa`` avx2, compound facts,
    questions to the assistant, never-stated last questions, 2-6 turns): stopped between
    checkpoints and resumed, it ends with the weights of a run that never stopped. Each run is a
    fresh process, as ``rxrt train`` is: the pin must come before torch's first kernel."""
    recipe = _continued(
        smol_ci_run,
        tmp_path,
        isa="avx2",
        data={"compound_facts": 0.3, "general_questions": 0.5, "recall_last": 0.5},
        memory_aware={"steps": 6, "min_turns": 2, "max_turns": 6, "ramp_start": 0, "ramp_end": 3},
    )

    def train(*args: str) -> int:
        argv = ["train", "--recipe", str(recipe), "--quiet", *args]
        code = f"import sys\nfrom rxruntime.cli import main\nsys.exit(main({argv!r}))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600).returncode

    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train("--out", str(whole)) == 0
    assert train("--out", str(split), "--stop-after", "4") == 3
    assert train("--out", str(split), "--resume") == 0
    a = load_weights(whole / "model" / "model.safetensors")
    b = load_weights(split / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs"
    start = load_weights(smol_ci_run / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    summary = json.loads((split / "summary.json").read_text())
    assert summary["isa"] == "avx2" and [m["capability"] for m in summary["machines"]] == ["AVX2"]
    assert summary["machines"][0]["from"] == "start"  # resumed on the same machine: one entry, from the start


def test_the_isa_pin_refuses_a_process_already_on_other_kernels() -> None:
    """ATen picks its kernels at its first one: a process that already ran some on other kernels
    cannot be pinned any more, and says how to start instead."""
    code = (
        "import os, torch\n"
        "torch.randn(64).exp()\n"  # ATen's kernels chosen here: the scalar ones (the environment below)
        "del os.environ['ATEN_CPU_CAPABILITY']\n"
        "from rxruntime.training.trainer import TrainingError, pin_isa\n"
        "try:\n    pin_isa('avx2')\nexcept TrainingError as e:\n    print(e)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 rxrt train" in result.stdout, result
    env["ATEN_CPU_CAPABILITY"] = "avx512"
    code = "from rxruntime.training.trainer import pin_isa\npin_isa('avx2')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0 and "ATEN_CPU_CAPABILITY=avx2; the environment has avx512" in result.stderr


def test_a_backbone_recipes_serving_defaults_reach_the_saved_config(tmp_path: Path) -> None:
    """``answer_tokens`` and the penalties of a backbone recipe's ``model`` go into the trained
    model's config.json, as a preset recipe's do. They were dropped: the shipped smol3 directory's
    were written in when the fields came, after its run, and a rerun of its recipe lost them."""
    spec = load_recipe("smol-ci").to_dict()
    spec["model"].update(answer_tokens=48, presence_penalty=0.3, frequency_penalty=0.2)
    spec["memory_pretrain"]["steps"] = spec["memory_aware"]["steps"] = 0
    path = tmp_path / "serving.json"
    path.write_text(json.dumps(spec))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert (config["answer_tokens"], config["presence_penalty"], config["frequency_penalty"]) == (48, 0.3, 0.2)
    assert load_pretrained(tmp_path / "run" / "model")[0].config.answer_tokens == 48


def test_recompute_trains_the_same_weights(tmp_path: Path) -> None:
    """``rxrt train --recompute`` runs each turn's reads and write again in the backward pass
    instead of keeping their activations: smol3's options on the tiny backbone (keep term, 2-4
    turns) give the same weights, bit for bit, with and without it, so a run may resume either
    way (it is not part of the recipe)."""
    path, _ = _smol3_shape(tmp_path, "smol3-recompute", {"steps": 4, "ramp_end": 2})
    plain, again = tmp_path / "plain", tmp_path / "again"
    assert main(["train", "--recipe", str(path), "--out", str(plain), "--quiet"]) == 0
    assert main(["train", "--recipe", str(path), "--out", str(again), "--quiet", "--stop-after", "2"]) == 3
    assert main(["train", "--recipe", str(path), "--out", str(again), "--quiet", "--resume", "--recompute"]) == 0
    a = load_weights(plain / "model" / "model.safetensors")
    b = load_weights(again / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "recomputing changed the weights"
