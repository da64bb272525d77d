"""Moved to :mod:`rxruntime.serving.zmq_server` (this name stays for existing imports)."""

from rxruntime.serving.errors import ProtocolError
from rxruntime.serving.zmq_server import Server

__all__ = ["ProtocolError", "Server"]
