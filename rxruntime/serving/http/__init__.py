"""The OpenAI-compatible HTTP front (``rxrt serve --http``): an ASGI app on the engine's public API.

A request's way: ``app`` (the route table, the key check of ``bearer``, errors as OpenAI error
objects from ``errors``) calls one module of ``routes/`` per API; a route reads its body with
``fields`` and ``messages`` (the one parser of OpenAI message lists), finds the conversation in the
``registry``, and drives the turn with ``turns`` (server-sent events included). ``context`` is what
one app holds (engine slot, metrics, registry, thread pools); Chat Completions' memory comes from
``replay`` and ``history_cache``; ``serve`` runs the app under uvicorn. See docs/http.md.
"""
