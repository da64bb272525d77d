"""Stand-ins for llama.cpp's model in the turn benchmark's child processes (tests only): one that
answers, one that dies of SIGSEGV as a crashing native build does, one that hangs. Importable by
name, because the benchmark spawns its peers and the child imports the factory it is given."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


class EchoModel:
    """Answers deterministically and counts the tokens in its "cache"."""

    def __init__(self, path: str | Path = "", **kwargs: object) -> None:
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0

    def next_token(self, tokens: list[int]) -> int:
        self.n_tokens += len(tokens)
        return 7 + (sum(tokens) + self.n_tokens) % 50

    def sequence_state_bytes(self) -> int:
        return 100 * self.n_tokens

    def tensor_bytes(self) -> int:
        return 1234

    def close(self) -> None:
        pass


class SegfaultModel(EchoModel):
    """Dies of SIGSEGV at its ``crash_at``-th prompt evaluation (1: the first, as the AMX build did)."""

    def __init__(self, path: str | Path = "", crash_at: int = 1, **kwargs: object) -> None:
        super().__init__(path)
        self.calls = 0
        self.crash_at = crash_at

    def next_token(self, tokens: list[int]) -> int:
        if len(tokens) > 1:  # a prompt evaluation, not a decode step
            self.calls += 1
            if self.calls >= self.crash_at:
                os.kill(os.getpid(), signal.SIGSEGV)
        return super().next_token(tokens)


class HangingModel(EchoModel):
    """Never returns from its first prompt evaluation."""

    def next_token(self, tokens: list[int]) -> int:
        time.sleep(3600)
        return 0


class ExitingModel(EchoModel):
    """Exits the process with code 3 when asked for a token (an abort in native code, say)."""

    def next_token(self, tokens: list[int]) -> int:
        os._exit(3)
