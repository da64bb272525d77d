"""The HTTP front deployed on Ray Serve (``rxrt serve --ray``): engine replicas sharing Redis.

``app`` builds the two deployments (``config.yaml`` is the same for Serve's own tools);
``ingress`` routes each request by conversation (``router``) to a ``replica``, which runs the
unchanged HTTP app through ``asgi`` and holds the conversation's lease (``leases``) around each
turn. What one process keeps for itself is in Redis here (``redis_tables``). See docs/scaling.md.
"""
