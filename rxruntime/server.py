"""Moved to :mod:`rxruntime.serving.zmq.server` (this name stays for existing imports)."""

from rxruntime.serving.zmq.errors import ProtocolError
from rxruntime.serving.zmq.server import Server

__all__ = ["ProtocolError", "Server"]
