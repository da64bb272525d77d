"""A throwaway ``redis-server`` (the distribution's package) on a free loopback port, for the soak,
the Ray tests and their scripts: started in a temporary folder, stopped and removed on exit.

No persistence by default. ``persistent=True`` turns on the append-only file with an fsync per
write, so ``stop()`` then ``start()`` (a Redis outage) brings back every acknowledged write."""

from __future__ import annotations

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


class RedisServer:
    """``with RedisServer() as redis: open_store(redis.url)``."""

    def __init__(self, *, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis-server is not installed (Debian: apt-get install redis-server)")
        self._binary = binary
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
            [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._dir, *self._disk],
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
                raise ConfigError(f"redis-server did not start on port {self.port}")
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
