"""What the benchmark scripts and the tests share, outside the installed package: the serving
fault soak's scenarios (``soak``), a throwaway ``redis-server`` (``redis_server``), a local Ray
cluster with the Serve application (``ray_cluster``) and a streamed-turn load client
(``http_load``).

Tests import it as ``benchmarks.harness`` (pytest puts the repository root on ``sys.path``); the
scripts in ``benchmarks/``, run as ``python benchmarks/NAME.py``, as ``harness``.
"""
