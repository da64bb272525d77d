"""The examples run, end to end, as a user would start them: on the embedded default model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def model_arg() -> list[str]:
    """The examples run on the embedded default model, as a user would run them (no flags)."""
    return []


def run(name: str, model_arg: list[str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *model_arg, *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_token_stream(model_arg: list[str]) -> None:
    out = run("token_stream.py", model_arg)
    assert out.count("> ") >= 5 and "[memory v5" in out
    assert "Your name is Julia." in out and "You live in Paris." in out  # facts from two and three turns back


def test_two_agents(model_arg: list[str]) -> None:
    out = run("two_agents.py", model_arg, "--rounds", "4")
    lines = [line for line in out.splitlines() if line.startswith(("alice:", "bob:"))]
    assert [line.split(":")[0] for line in lines] == ["alice", "bob", "alice", "bob"]
    assert "alice STM v3, bob STM v3" in out  # memory_init + two turns each


def test_fan_out(model_arg: list[str]) -> None:
    out = run("fan_out.py", model_arg)
    assert out.splitlines() == ["lima: You live in Lima.", "oslo: You live in Oslo.", "rome: You live in Rome."]


def test_system_memory(model_arg: list[str]) -> None:
    out = run("system_memory.py", model_arg)
    assert out.count("with system memory: Your name is Zoe.") == 2 and out.count("blank memory:") == 2


def test_async_client(model_arg: list[str]) -> None:
    out = run("async_client.py", model_arg)
    assert out.count("[a] memory v") == 2 and out.count("[b] memory v") == 2
    assert "-> 'Your name is Julia.'" in out and "-> 'You live in Lima.'" in out  # each from its own STM
