"""The zmq client's public face: ``from rxruntime.serving.client import Client, ClientKeys``.

The code is in :mod:`rxruntime.serving.zmq.client`; these are the same objects.
"""

from rxruntime.serving.zmq.client import Client, RemoteConversation
from rxruntime.serving.zmq.curve import ClientKeys
from rxruntime.serving.zmq.errors import AuthenticationError, ConnectionLost, RemoteError

__all__ = ["AuthenticationError", "Client", "ClientKeys", "ConnectionLost", "RemoteConversation", "RemoteError"]
