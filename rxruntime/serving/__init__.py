"""Serving: the fronts that put an engine on the network, one room each.

* ``zmq/``: ``rxrt serve --bind``: the msgpack wire format (``wire``), the server, the client,
  CURVE keys (``curve``), per-peer back-pressure (``peers``), the transport's errors.
* ``http/``: ``rxrt serve --http``: the OpenAI-compatible ASGI app (``app``), one module per API
  under ``routes/``, one message parser (``messages``), bearer keys (``bearer``), SSE and turns.
* ``ray/``: ``rxrt serve --ray``: the HTTP app deployed on Ray Serve, with what it keeps in
  Redis (``redis_tables``, ``leases``) and its routing by conversation.
* ``ownership``: who owns which conversation, the one rule both fronts follow.

zmq and HTTP never import each other; Ray deploys the HTTP app, so it imports ``http``, and no
front imports ``ray`` (``[tool.importlinter]`` in pyproject.toml keeps this true).
"""

from rxruntime.serving import _moved

_moved.install()
