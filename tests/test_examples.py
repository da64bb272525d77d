"""The examples run, end to end, as a user would start them (on a small model directory here;
on the embedded default model once the package ships one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rxruntime.models import RxTModel, RxTokenizer
from rxruntime.models.checkpoint import default_model_dir

from .conftest import tiny_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def model_arg(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    if (default_model_dir() / "model.safetensors").exists():
        return []  # the embedded default model
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    tok = RxTokenizer.train(["Hi, I'm Ada and my cat is called Pixel. I live in Oslo. Where do I live?"] * 30, 300)
    RxTModel(tiny_config(vocab_size=300, max_seq_len=64)).save_pretrained(path, tokenizer=tok)
    return ["--model", str(path)]


def run(name: str, model_arg: list[str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *model_arg, *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_token_stream(model_arg: list[str]) -> None:
    out = run("token_stream.py", model_arg)
    assert out.count("> ") >= 3 and "[memory v3" in out


def test_two_agents(model_arg: list[str]) -> None:
    out = run("two_agents.py", model_arg, "--rounds", "4")
    lines = [line for line in out.splitlines() if line.startswith(("alice:", "bob:"))]
    assert [line.split(":")[0] for line in lines] == ["alice", "bob", "alice", "bob"]
    assert "alice STM v3, bob STM v3" in out  # memory_init + two turns each


def test_fan_out(model_arg: list[str]) -> None:
    out = run("fan_out.py", model_arg)
    assert [line.split(":")[0] for line in out.splitlines()] == ["lima", "oslo", "rome"]


def test_system_memory(model_arg: list[str]) -> None:
    out = run("system_memory.py", model_arg)
    assert out.count("with system memory:") == 2 and out.count("blank memory:") == 2


def test_async_client(model_arg: list[str]) -> None:
    out = run("async_client.py", model_arg)
    assert out.count("[a] memory v") == 2 and out.count("[b] memory v") == 2
