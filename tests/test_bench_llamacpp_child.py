"""The llama.cpp peer of ``rxrt bench turns`` runs in child processes, so a crash, an exit or a
hang in native code is reported and the other series complete (issue 27). Runs without llama.cpp:
the stand-ins of ``llamacpp_fakes`` are started exactly as the real model is, by name, in a
spawned child."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from rxruntime.bench import llamacpp_turns, turns
from rxruntime.bench.llamacpp_turns import LlamaCppPeer, PeerFailedError, run_in_child
from rxruntime.cli import main

from .llamacpp_fakes import EchoModel, ExitingModel, HangingModel, SegfaultModel


def _peer(factory: Any, mode: str = "cached", timeout_s: float = 120.0, **kwargs: Any) -> LlamaCppPeer:
    peer = LlamaCppPeer("q8_0", mode, factory, {"path": "unused.gguf", **kwargs}, eos_id=3, timeout_s=timeout_s)  # type: ignore[arg-type]
    peer.wait_loaded()
    return peer


def test_a_peer_in_its_child_answers_and_keeps_its_cache() -> None:
    peer = _peer(EchoModel)
    try:
        assert peer.tensor_bytes == 1234
        peer.start_conversation()
        ttft, turn, answer = peer.turn([], [1, 2, 3], 4)
        assert 0 <= ttft <= turn and len(answer) == 4
        # cached mode: the prompt, then 3 decode steps; the last answer token and EOS are pending
        assert peer.state() == {"state_bytes": 600, "cached_tokens": 6}
        peer.turn([1, 2, 3, *answer, 3], [4, 5], 2)
        assert peer.state()["cached_tokens"] == 6 + 2 + 2 + 1
    finally:
        peer.close()
    assert not peer._child.process.is_alive()


def test_a_segfault_is_reported_with_its_signal_and_phase() -> None:
    peer = _peer(SegfaultModel)
    peer.start_conversation()
    with pytest.raises(PeerFailedError) as info:
        peer.turn([], [1, 2, 3], 4, "at turn 1 of repeat 1")
    assert info.value.reason == f"crashed (signal {int(signal.SIGSEGV)}, SIGSEGV)"
    assert peer.describe_failure() == (
        f"llama.cpp q8_0, prompt cache kept: crashed (signal {int(signal.SIGSEGV)}, SIGSEGV) at turn 1 of repeat 1"
    )
    with pytest.raises(PeerFailedError):  # it stays failed, and says so at once
        peer.start_conversation()
    peer.close()


def test_a_hang_times_out_and_the_child_is_killed() -> None:
    peer = _peer(HangingModel, mode="reread", timeout_s=1.0)
    with pytest.raises(PeerFailedError, match=r"timed out after 1 s at turn 2"):
        peer.turn([], [1, 2], 3, "at turn 2")
    assert not peer._child.process.is_alive()
    peer.close()


def test_an_exit_and_a_python_error_are_reported() -> None:
    peer = _peer(ExitingModel)
    with pytest.raises(PeerFailedError, match=r"exited with code 3"):
        peer.turn([], [1, 2], 3)
    peer.close()
    broken = LlamaCppPeer("f32", "cached", EchoModel, {"no_such_argument": 1, "path": 1, "oops": 2}, eos_id=3)
    broken.close()  # never waited for: closing an unloaded child is fine
    with pytest.raises(PeerFailedError, match=r"failed \(FileNotFoundError"):
        run_in_child(Path.read_text, Path("/nonexistent/file"), timeout_s=60)


def _fake_prepare(factories: dict[str, Any]) -> Any:
    """A ``prepare_peers`` that starts ``factories`` (series key -> model class) as the real one
    starts llama.cpp: one spawned child per series, loaded before the conversation starts."""

    def prepare(llama: Any, types: list[str], **kwargs: Any) -> tuple[list[LlamaCppPeer], dict[str, Any], Any]:
        peers = []
        for key, factory in factories.items():
            gguf_type, _, mode = key.removeprefix("llamacpp_").rpartition("_")
            extra = {"crash_at": 2} if key.endswith("reread") and factory is SegfaultModel else {}
            limit = kwargs["timeout_s"]
            peer = LlamaCppPeer(gguf_type, mode, factory, {"path": "x", **extra}, eos_id=3, timeout_s=limit)  # type: ignore[arg-type]
            peer.wait_loaded()
            peers.append(peer)
        return peers, {"llamacpp_timeout_s": kwargs["timeout_s"]}, {}

    return prepare


def test_turns_survive_a_crashing_and_a_hanging_peer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """q8_0 segfaults on its first prompt (the warm-up) in cached mode and at the second (turn 1)
    when re-reading; f32 cached hangs; f32 re-read works. RxT and the other series complete."""
    factories = {
        "llamacpp_f32_cached": HangingModel,
        "llamacpp_f32_reread": EchoModel,
        "llamacpp_q8_0_cached": SegfaultModel,
        "llamacpp_q8_0_reread": SegfaultModel,
    }
    monkeypatch.setattr(turns, "prepare_peers", _fake_prepare(factories))
    monkeypatch.setattr(turns, "check_llama_cpp", lambda: None)
    argv = ["bench", "turns", "--preset", "nano", "--turns", "2", "--answer-tokens", "4", "--baseline", "llamacpp"]
    assert main([*argv, "--llamacpp-timeout", "2", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    sig = f"signal {int(signal.SIGSEGV)}, SIGSEGV"
    assert result["failures"] == {
        "llamacpp_f32_cached": "llama.cpp f32, prompt cache kept: timed out after 2 s at the warm-up turn",
        "llamacpp_q8_0_cached": f"llama.cpp q8_0, prompt cache kept: crashed ({sig}) at the warm-up turn",
        "llamacpp_q8_0_reread": f"llama.cpp q8_0, history re-read: crashed ({sig}) at turn 1 of repeat 1",
    }
    assert set(result["series"]) == {"rxt", "baseline", "llamacpp_f32_reread"}
    assert [r["turn"] for r in result["rxt"]] == [1, 2]
    assert [r["turn"] for r in result["llamacpp_f32_reread"]] == [1, 2]
    assert "llamacpp_q8_0_reread" not in result and result["memory"]["llamacpp_kv_at_last_turn"] == {}
    assert {c["other"] for c in result["summary"]["comparisons"]} == {"baseline", "llamacpp_f32_reread"}
    assert json.loads((tmp_path / "turns-nano.json").read_text())["failures"] == result["failures"]
    # The table says it too.
    assert main([*argv, "--llamacpp-timeout", "2"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert f"NOT MEASURED: llama.cpp q8_0, prompt cache kept: crashed ({sig})" in out


def test_prepare_peers_reports_a_crashing_llama_cpp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Even loading llama.cpp (its version and system info) runs in a child: a crash there fails
    every llama.cpp series and returns no peers, instead of ending the benchmark."""
    monkeypatch.setattr(llamacpp_turns, "llama_cpp_facts", _segfault)
    peers, _, failed = llamacpp_turns.prepare_peers(
        None, ["f32", "q8_0"], n_ctx=64, threads=1, special_ids={"eos": 3}, workdir=tmp_path, timeout_s=60
    )
    assert peers == [] and len(failed) == 4
    assert failed["llamacpp_f32_cached"].endswith("crashed (signal 11, SIGSEGV) while loading llama.cpp")


def _segfault() -> dict[str, str]:
    import os

    os.kill(os.getpid(), signal.SIGSEGV)
    return {}
