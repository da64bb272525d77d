"""Moved to :mod:`rxruntime.serving.client` (this name stays for existing imports)."""

from rxruntime.serving.client import Client, ConnectionLost, RemoteConversation, RemoteError

__all__ = ["Client", "ConnectionLost", "RemoteConversation", "RemoteError"]
