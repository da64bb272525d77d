"""CURVE keys for ``rxrt serve --keys`` and ``Client(keys=...)``: who may connect, and who is who.

``rxrt keygen DIR`` writes zmq's certificate files (docs/protocol.md, "Authentication")::

    DIR/server.key, DIR/server.key_secret      the server's keypair (the secret stays on the server)
    DIR/authorized/<name>.key                   client public keys the server accepts
    DIR/clients/<name>.key, <name>.key_secret   each client's keypair (hand it to that client)

Every ``*_secret`` file is created mode 0600. A client's CURVE public key is its identity: the
conversations it opens belong to it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from rxruntime.models.errors import ConfigError

SERVER = "server"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@contextlib.contextmanager
def _private_files() -> Iterator[None]:
    """New files readable by their owner only, from the moment they exist."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _keypair(directory: Path, name: str) -> tuple[Path, Path]:
    with _private_files():
        public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def generate_keys(directory: str | Path, clients: Sequence[str] = ("client",)) -> list[Path]:
    """Write a server keypair (kept if one exists) and one keypair per client name; returns the
    files written. Existing client keys are never overwritten."""
    root = Path(directory)
    for name in clients:
        if not _NAME.fullmatch(name) or name == SERVER:
            raise ConfigError(f"client name {name!r}: use letters, digits, '_', '-', '.' (and not {SERVER!r})")
    for sub in (root, root / "authorized", root / "clients"):
        sub.mkdir(parents=True, exist_ok=True)
        os.chmod(sub, 0o700)
    written: list[Path] = []
    if not (root / f"{SERVER}.key_secret").exists():
        written += _keypair(root, SERVER)
    for name in clients:
        if (root / "clients" / f"{name}.key_secret").exists():
            raise ConfigError(f"{root / 'clients' / name}.key_secret exists; pick another name")
        public, secret = _keypair(root / "clients", name)
        shutil.copyfile(public, root / "authorized" / public.name)
        written += [public, secret, root / "authorized" / public.name]
    return written


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such key file (create keys with `rxrt keygen`)")
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except Exception as exc:
        raise ConfigError(f"{path}: not a zmq certificate ({exc})") from None
    if secret and secret_key is None:
        raise ConfigError(f"{path}: holds no secret key")
    return public, secret_key


@dataclass(frozen=True)
class ServerKeys:
    """The server's keypair and the folder of client public keys it accepts."""

    public: bytes
    secret: bytes
    authorized: Path

    @classmethod
    def load(cls, directory: str | Path) -> ServerKeys:
        root = Path(directory)
        public, secret = _load(root / f"{SERVER}.key_secret", secret=True)
        assert secret is not None
        authorized = root / "authorized"
        if not authorized.is_dir() or not any(authorized.glob("*.key")):
            raise ConfigError(f"{authorized}: no client public keys; `rxrt keygen {root} --clients NAME` adds one")
        return cls(public, secret, authorized)


@dataclass(frozen=True)
class ClientKeys:
    """A client's keypair and the public key of the server it trusts."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, directory: str | Path, name: str = "client") -> ClientKeys:
        """From a ``rxrt keygen`` folder (or a copy holding ``server.key`` and ``clients/<name>.*``)."""
        root = Path(directory)
        public, secret = _load(root / "clients" / f"{name}.key_secret", secret=True)
        server_public, _ = _load(root / f"{SERVER}.key", secret=False)
        assert secret is not None
        return cls(public, secret, server_public)
