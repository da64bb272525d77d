"""The zmq front (``rxrt serve --bind``): one engine behind a ROUTER socket, msgpack frames.

A request's way: ``server`` (the socket thread, lanes per conversation) reads it, ``wire`` checks
every field, ``conversations`` finds the caller's conversation (ownership: ``serving/ownership.py``),
the engine runs the turn, and its events go back through the peer's bounded outbox (``peers``).
``client`` is the other end; ``curve`` holds the CURVE keys (``rxrt keygen``); ``errors`` the
transport's own exceptions. See docs/protocol.md.
"""
