"""``rxrt train`` end to end on the ``ci`` recipe, exact resume, and ``rxrt eval memory --json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rxruntime.cli import main
from rxruntime.models import RxTModel, load_pretrained
from rxruntime.models.checkpoint import load_weights
from rxruntime.training.people_eval import EVAL_SPLITS
from rxruntime.training.recipe import load_recipe

STAGE_DIRS = ("stage1-joint-pretrain", "stage2-joint-sft", "stage3-memory-pretrain", "stage4-memory-aware")


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ci-run")
    assert main(["train", "--recipe", "ci", "--out", str(out), "--quiet"]) == 0
    return out


def test_ci_recipe_trains_every_stage_into_a_loadable_model(ci_run: Path) -> None:
    for name in STAGE_DIRS:
        assert (ci_run / name / "model.safetensors").is_file()
    model, tokenizer = load_pretrained(ci_run / "model")
    assert isinstance(model, RxTModel) and tokenizer is not None
    assert model.config == load_recipe("ci").config()
    # 16-bit weights on disk, and no training-only tensors (the MLM head) in the shipped model
    tensors = load_weights(ci_run / "model" / "model.safetensors")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    assert not any(k.startswith("mlm") for k in tensors)
    summary = json.loads((ci_run / "summary.json").read_text())
    assert summary["threads"] == 1 and summary["seed"] == 7
    stages = summary["stages"]
    assert [stages[s]["steps"] for s in ("joint_pretrain", "joint_sft", "memory_pretrain", "memory_aware")] == [
        12,
        12,
        6,
        10,
    ]
    assert stages["joint_pretrain"]["last"]["loss"] < stages["joint_pretrain"]["first"]["loss"]


def test_interrupted_and_resumed_run_ends_with_the_same_weights(ci_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    # 17 steps: stops inside stage 2, between two periodic checkpoints
    assert main(["train", "--recipe", "ci", "--out", str(out), "--quiet", "--stop-after", "17"]) == 3
    assert not (out / "model").exists()
    assert main(["train", "--recipe", "ci", "--out", str(out), "--quiet", "--resume", "--stop-after", "12"]) == 3
    assert main(["train", "--recipe", "ci", "--out", str(out), "--quiet", "--resume"]) == 0
    for name in (*STAGE_DIRS, "model"):
        a = load_weights(ci_run / name / "model.safetensors")
        b = load_weights(out / name / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"


def test_a_resumed_run_logs_the_lines_of_an_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log line averages the steps since the line before; a run stopped between two lines goes
    on averaging those steps after its resume (they are in its state), and the lines a stopped
    process wrote after its last checkpoint are dropped, so the log is the uninterrupted run's."""
    from rxruntime.training import trainer

    monkeypatch.setattr(trainer, "LOG_LINES", 4)  # stage 2's 12 steps: a line every 3
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", "--recipe", "ci", "--out", str(whole), "--quiet", "--stop-after", "20"]) == 3
    # 16 steps: stage 2 at step 4, one step after its line at 3
    assert main(["train", "--recipe", "ci", "--out", str(split), "--quiet", "--stop-after", "16"]) == 3
    log = split / "train-log.jsonl"
    # what a process killed after its last checkpoint leaves: a line the resumed run computes anew
    with log.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"stage": "joint_sft", "step": 6, "loss": 99.0}) + "\n")
    assert main(["train", "--recipe", "ci", "--out", str(split), "--quiet", "--resume", "--stop-after", "4"]) == 3
    lines = log.read_text().splitlines()
    assert lines == (whole / "train-log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if json.loads(x)["stage"] == "joint_sft"] == [3, 6]


def test_without_a_terminal_each_log_line_is_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Under nohup or CI no progress bar can be drawn: each line of train-log.jsonl is echoed with
    the stage's step, its metrics, the pace and the time left; --quiet keeps only the summaries."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", "ci", "--out", str(out), "--stop-after", "20"]) == 3
    err = capsys.readouterr().err
    logged = [json.loads(line) for line in (out / "train-log.jsonl").read_text().splitlines()]
    printed = [line for line in err.splitlines() if " s/step, about " in line]
    assert logged and len(printed) == len(logged)
    for line, entry in zip(printed, logged):
        assert line.startswith(f"{entry['stage']} step {entry['step']}/")
        assert f"loss {entry['loss']:.4f}" in line and line.endswith(" left")
    assert main(["train", "--recipe", "ci", "--out", str(out), "--resume", "--quiet", "--stop-after", "4"]) == 3
    assert " s/step" not in capsys.readouterr().err


def test_export_writes_a_run_as_of_its_checkpoint(
    ci_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--export`` writes the run's newest state as the model directory the finished run writes:
    of a finished run, the same tensors as OUT/model; of a stopped one, the state's weights."""
    from rxruntime.training.state import STATE_FILE

    assert main(["train", "--recipe", "ci", "--out", str(ci_run), "--export", str(tmp_path / "final")]) == 0
    a = load_weights(ci_run / "model" / "model.safetensors")
    b = load_weights(tmp_path / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "final" / "config.json").read_text()) == json.loads(
        (ci_run / "model" / "config.json").read_text()
    )
    assert (tmp_path / "final" / "tokenizer.json").read_bytes() == (ci_run / "model" / "tokenizer.json").read_bytes()

    run = tmp_path / "stopped"
    assert main(["train", "--recipe", "ci", "--out", str(run), "--quiet", "--stop-after", "33"]) == 3
    capsys.readouterr()
    assert main(["train", "--recipe", "ci", "--out", str(run), "--export", str(tmp_path / "mid")]) == 0
    assert "memory_aware step 3" in capsys.readouterr().err
    state = {k[len("model.") :]: v for k, v in load_weights(run / STATE_FILE).items() if k.startswith("model.")}
    model, _ = load_pretrained(tmp_path / "mid")
    exported = model.state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k].to(torch.bfloat16).float()) for k in state)
    assert not (run / "model").exists()

    assert main(["train", "--recipe", "ci", "--out", str(run), "--resume", "--export", str(tmp_path / "x")]) == 2
    assert "--export trains nothing" in capsys.readouterr().err
    assert main(["train", "--recipe", "ci", "--out", str(run), "--export", str(run / "model")]) == 2


def test_a_run_started_from_stage3_trains_stage4_only_to_the_same_weights(ci_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "from3"
    start = ci_run / "stage3-memory-pretrain"
    assert main(["train", "--recipe", "ci", "--out", str(out), "--quiet", "--start-from", str(start)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["started_from"] == str(start)
    assert [summary["stages"][s]["steps"] for s in ("joint_pretrain", "memory_pretrain", "memory_aware")] == [0, 0, 10]
    assert not (out / "stage3-memory-pretrain").exists()
    # stage 4 draws its data and noise from (seed, stage, step) alone, so it ends where the full run did
    a = load_weights(ci_run / "model" / "model.safetensors")
    b = load_weights(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tokenizer.json").read_bytes() == (ci_run / "tokenizer.json").read_bytes()


def test_start_from_needs_a_stage_directory(ci_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--recipe", "ci", "--out", str(tmp_path / "x"), "--quiet", "--start-from", str(ci_run)]) == 2
    assert "not a stage directory" in capsys.readouterr().err


def test_a_second_fresh_run_into_a_used_directory_is_refused(ci_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--recipe", "ci", "--out", str(ci_run), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_unknown_recipe_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--recipe", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "ci" in err and "nano" in err


def test_eval_memory_json_reports_every_gap_for_both_settings_and_splits(
    ci_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--batch-size 5 splits each length group into several batches (the C step's row counts)."""
    args = ["--suite", "templates", "--dialogues", "2", "--batch-size", "5", "--json"]
    code = main(["eval", "memory", "--model", str(ci_run / "model"), *args])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["suite"] == "templates" and result["batch_size"] == 5
    keys = [str(k) for k in range(1, 9)]
    for part in (result, result["hard"]):
        assert list(part["with_memory"]) == keys and list(part["reset_memory"]) == keys
        assert all(0.0 <= v <= 1.0 for v in [*part["with_memory"].values(), *part["reset_memory"].values()])
        assert part["dialogues"] == 2 * 8


def test_eval_memory_templates_table(ci_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--suite", "templates", "--dialogues", "1", "--max-gap", "2", "--no-hard"]
    code = main(["eval", "memory", "--model", str(ci_run / "model"), *args])
    assert code == 0
    out = capsys.readouterr().out
    assert "with memory" in out and "STM reset" in out and "hard" not in out


def test_eval_memory_reports_progress_without_a_terminal(ci_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The people suite plays for many minutes at full size: with stderr in a file it prints a
    line at every tenth of the dialogues (both settings count), ending at all of them."""
    args = ["--dialogues", "2", "--max-gap", "2", "--splits", "facts_1,facts_2", "--batch-size", "1", "--json"]
    assert main(["eval", "memory", "--model", str(ci_run / "model"), *args]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("eval memory: ")]
    total = 2 * 2 * 2 * 2  # dialogues x gaps x splits x settings
    done = [int(line.split()[2].split("/")[0]) for line in lines]
    assert len(lines) == 10 and done == sorted(done) and done[-1] == total, lines
    assert all(f"/{total} dialogues" in line and line.endswith(" s left") for line in lines)
    assert json.loads(captured.out)["suite"] == "people"  # stdout stays the JSON alone


def test_eval_memory_people_json_reports_every_split_gap_and_setting(
    ci_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["eval", "memory", "--model", str(ci_run / "model"), "--dialogues", "1", "--max-gap", "3", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["suite"] == "people"
    splits = result["splits"]
    assert list(splits) == list(EVAL_SPLITS)  # the generator's splits, then the hand-written one
    for scores in splits.values():
        for setting in ("with_memory", "reset_memory"):
            assert list(scores[setting]) == ["1", "2", "3"]
            assert all(v in (0.0, 1.0) for v in scores[setting].values())  # one dialogue per k: right or wrong
        assert scores["dialogues"] == 3


def test_eval_memory_people_table_and_bad_split(ci_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(ci_run / "model")
    args = ["--dialogues", "1", "--max-gap", "2", "--splits", "unseen_values,corrections"]
    assert main(["eval", "memory", "--model", model, *args]) == 0
    out = capsys.readouterr().out
    assert "unseen_values" in out and "corrections" in out and "k=2" in out and "in_domain" not in out
    assert main(["eval", "memory", "--model", model, "--splits", "nope"]) == 2
    assert "unknown split" in capsys.readouterr().err
    assert main(["eval", "memory", "--model", model, "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
