"""The examples run, end to end, as a user would start them, on the shipped ``small`` model (fast;
the dialogues below are ones it recalls from every starting memory the examples use)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name: str, *args: str) -> str:
    command = [sys.executable, str(EXAMPLES / name), "--model", "small", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_token_stream() -> None:
    out = run("token_stream.py")
    assert out.count("> ") >= 5 and "[memory v5" in out
    assert "You live in Lisbon." in out and "Your name is Julia." in out  # facts from two turns and one turn back


def test_two_agents() -> None:
    out = run("two_agents.py", "--rounds", "4")
    lines = [line for line in out.splitlines() if line.startswith(("alice:", "bob:"))]
    assert [line.split(":")[0] for line in lines] == ["alice", "bob", "alice", "bob"]
    assert "alice STM v3, bob STM v3" in out  # memory_init + two turns each


def test_fan_out() -> None:
    out = run("fan_out.py")
    assert out.splitlines() == ["berlin: You live in Berlin.", "cairo: You live in Cairo.", "oslo: You live in Oslo."]


def test_system_memory() -> None:
    out = run("system_memory.py")
    assert out.count("with system memory: Your name is Zoe.") == 2 and out.count("blank memory:") == 2


def test_async_client() -> None:
    out = run("async_client.py")
    assert out.count("[a] memory v") == 2 and out.count("[b] memory v") == 2
    assert "-> 'Your name is Julia.'" in out and "-> 'You live in Lima.'" in out  # each from its own STM


def test_openai_sdk() -> None:
    out = run("openai_sdk.py")
    assert "You live in Lisbon.  (input tokens: 8)" in out  # recalled from memory; the prompt held 8 tokens
    assert "\nYour name is Julia.\n" in out and "[rxrt.memory.updated: STM v5]" in out  # the streamed answer
    assert "chat: Your name is Julia.  (history miss, 1 turn replayed)" in out
