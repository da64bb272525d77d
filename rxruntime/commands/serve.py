"""``rxrt serve``: serve a model over zmq + msgpack (docs/protocol.md), HTTP (docs/http.md), or both;
``--ray`` deploys the HTTP front on Ray Serve with engine replicas sharing Redis (docs/scaling.md)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rxruntime.commands import add_engine_options, add_model_options, engine_options
from rxruntime.commands.stop_signals import StopSignals

if TYPE_CHECKING:
    from rxruntime.engine import Engine
    from rxruntime.serving.zmq.curve import ServerKeys
    from rxruntime.serving.zmq.server import Server
    from rxruntime.stores import STMStore


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("serve", help="serve a model over zmq (msgpack frames) and/or OpenAI-compatible HTTP")
    p.add_argument("--model", default="default", help="model directory, hub id, or 'default' (the embedded model)")
    add_model_options(p)
    p.add_argument(
        "--bind",
        default=None,
        help="zmq address (default tcp://127.0.0.1:5555 without --http; with --http, zmq only if given)",
    )
    p.add_argument("--http", default=None, metavar="HOST:PORT", help="serve the OpenAI-compatible HTTP API here")
    p.add_argument(
        "--api-key", action="append", default=[], help="HTTP: accepted bearer key (repeatable; none: no auth)"
    )
    p.add_argument("--api-key-file", default=None, help="HTTP: file of accepted keys, one per line")
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="HTTP: a browser origin allowed to call the API (repeatable; '*' for any; none: CORS off)",
    )
    p.add_argument(
        "--metrics-key",
        action="append",
        default=[],
        help="HTTP: a bearer key /metrics requires (repeatable; none: /metrics is open, /v1 keys still guard /v1)",
    )
    p.add_argument(
        "--no-ui",
        dest="ui",
        action="store_false",
        help="HTTP: do not serve the chat page at / (the API alone; docs/http.md, 'The page')",
    )
    p.add_argument("--model-name", default="rxt", help="HTTP: the model id /v1/models lists (default %(default)s)")
    p.add_argument(
        "--store",
        default="sqlite:///rxrt-stm.db",
        help="where STMs persist: sqlite:///file.db (default %(default)s), redis://host:port/db, memory://",
    )
    p.add_argument("--max-batch", type=int, default=64, help="conversations decoded together (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_engine_options(p)
    p.add_argument(
        "--weights",
        choices=("fp32", "bf16", "int8"),
        default=None,
        help="CPU weight format for decoding: fp32, bf16 or int8 (default: int8 where the C step runs the model,"
        " fp32 for RxLM checkpoints)",
    )
    p.add_argument("--max-message-bytes", type=int, default=1 << 20, help="largest request accepted")
    p.add_argument(
        "--keys",
        default=None,
        metavar="DIR",
        help="CURVE keys from `rxrt keygen DIR`: only the client keys in DIR/authorized may connect",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --bind without --keys (anyone who can reach it may use it)",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=10.0,
        help="seconds of silence after which a client is dead and its turns cancelled (default %(default)s)",
    )
    ray = p.add_argument_group("Ray Serve (needs the ray extra; docs/scaling.md)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="deploy the HTTP front and --replicas engine replicas on Ray Serve (joins $RAY_ADDRESS if set); "
        "needs --http and a redis:// --store",
    )
    ray.add_argument("--replicas", type=int, default=2, help="engine replicas (default %(default)s)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (1: one GPU each)")
    ray.add_argument(
        "--lease-ttl", type=float, default=10.0, help="seconds before a dead replica's conversations move on"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.ray:
        return _run_ray(args)
    if args.http is not None:
        return _run_http(args)
    return _run_zmq(args, args.bind or "tcp://127.0.0.1:5555")


def _run_zmq(args: argparse.Namespace, bind: str) -> int:
    from rich.console import Console

    from rxruntime.stores import open_store

    console = Console(highlight=False)
    keys = _zmq_keys(args, bind)  # before loading the model
    store = open_store(args.store)
    stop = StopSignals()  # before the server answers anyone: no signal is lost
    with _load(args, store) as engine:
        server = _zmq_server(engine, args, bind, keys)
        try:  # the server (and its authenticator thread) stops however this ends
            auth = f"CURVE keys from {args.keys}" if keys else "no authentication"
            console.print(
                f"rxrt serve: {server.endpoint} · {auth} · store {args.store} · device {engine.device} · Ctrl-C stops"
            )
            stop.wait()
            console.print("stopping: finishing owed memory updates")
        finally:
            server.stop()
    store.close()
    return 0


def _load(args: argparse.Namespace, store: STMStore | None) -> Engine:
    """The engine every front serves, from the command line's model options."""
    import rxruntime

    return rxruntime.load(
        args.model,
        device=args.device,
        max_batch=args.max_batch,
        store=store,
        weights=args.weights,
        tokenizer=args.tokenizer,
        rxlm_version=args.rxlm_version,
        **engine_options(args),
    )


def _zmq_keys(args: argparse.Namespace, bind: str) -> ServerKeys | None:
    """The CURVE keys of ``--keys``; a non-loopback ``bind`` without them is refused unless ``--insecure``."""
    from rxruntime.models.errors import ConfigError
    from rxruntime.serving.zmq.curve import ServerKeys
    from rxruntime.serving.zmq.server import is_loopback

    keys = ServerKeys.load(args.keys) if args.keys else None
    if keys is None and not args.insecure and not is_loopback(bind):
        raise ConfigError(f"refusing to serve {bind} without --keys (rxrt keygen DIR); --insecure overrides")
    return keys


def _zmq_server(engine: Engine, args: argparse.Namespace, bind: str, keys: ServerKeys | None) -> Server:
    from rxruntime.serving.zmq.server import Server

    return Server(
        engine,
        bind,
        keys=keys,
        insecure=args.insecure,
        max_message_bytes=args.max_message_bytes,
        peer_timeout_s=args.peer_timeout,
    ).start()


def _run_http(args: argparse.Namespace) -> int:
    """uvicorn in the foreground; the model loads once it listens (``/health`` says 503 until then),
    and the zmq server, if ``--bind`` is given, starts on the same engine when it is loaded."""
    from typing import Any

    from rich.console import Console

    from rxruntime.serving.http.app import create_app
    from rxruntime.serving.http.bearer import KeyRing
    from rxruntime.serving.http.serve import parse_address, serve
    from rxruntime.stores import open_store

    console = Console(highlight=False)
    parse_address(args.http)  # a bad address fails now, not after loading
    keys = KeyRing.from_file(args.api_key_file, args.api_key) if args.api_key_file else KeyRing(args.api_key)
    store = open_store(args.store)
    zmq: dict[str, Any] = {}
    zmq_keys = _zmq_keys(args, args.bind) if args.bind else None  # a refused --bind fails before loading

    def load() -> Engine:
        return _load(args, store)

    def on_ready(engine: Engine) -> None:
        where = f"http://{args.http}"
        if args.bind:
            zmq["server"] = _zmq_server(engine, args, args.bind, zmq_keys)
            where += f" and {zmq['server'].endpoint}"
        auth = f"{'keys required' if keys.enabled else 'no API key'}"
        if args.ui:
            auth += f" · chat page at http://{args.http}/"
        console.print(f"rxrt serve: {where} · store {args.store} · device {engine.device} · {auth} · Ctrl-C stops")

    def on_shutdown() -> None:
        if "server" in zmq:
            zmq["server"].stop()

    app = create_app(
        load,
        api_keys=keys,
        model_name=args.model_name,
        max_body_bytes=args.max_message_bytes,
        cors_origins=args.cors_origin,
        metrics_keys=args.metrics_key,
        ui=args.ui,
        on_ready=on_ready,
        on_shutdown=on_shutdown,
    )
    serve(app, args.http)
    store.close()
    return 0


def _run_ray(args: argparse.Namespace) -> int:
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster and deploy ``ray_app.application`` on it;
    Ctrl-C deletes the application, which drains every replica (owed memory updates commit)."""
    import os

    from rich.console import Console

    from rxruntime.models.errors import ConfigError
    from rxruntime.serving.http.bearer import KeyRing
    from rxruntime.serving.http.serve import parse_address

    if args.http is None or not args.store.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("--ray needs --http HOST:PORT and --store redis://HOST:PORT/DB (the replicas' shared memory)")
    if args.bind:
        raise ConfigError("--ray serves HTTP only; the zmq front (--bind) stays single-process: run it without --ray")
    if args.replicas < 1:
        raise ConfigError("--replicas must be at least 1")
    if args.tokenizer or args.rxlm_version:
        raise ConfigError(
            "--ray replicas load --model by itself: write a directory with the tokenizer and the RxLM release's "
            "numbers first (rxrt convert SRC DST --tokenizer ... --rxlm-version ...) and serve DST"
        )
    host, port = parse_address(args.http)
    keys = KeyRing.from_file(args.api_key_file, args.api_key) if args.api_key_file else KeyRing(args.api_key)
    try:
        import ray
        from ray import serve

        from rxruntime.serving.ray.app import APP_NAME, application, run
    except ImportError as exc:
        raise ConfigError(f"--ray needs the ray extra: pip install 'rxruntime[ray]' ({exc})") from None

    console = Console(highlight=False)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True)
    app = application(
        args.store,
        replicas=args.replicas,
        num_cpus=args.replica_cpus,
        num_gpus=args.replica_gpus,
        model=args.model,
        device=args.device,
        max_batch=args.max_batch,
        **engine_options(args),
        api_keys=list(keys.keys),
        model_name=args.model_name,
        lease_ttl_s=args.lease_ttl,
        ui=args.ui,
    )
    stop = StopSignals()
    run(app, host, port)
    console.print(
        f"rxrt serve --ray: http://{args.http} · {args.replicas} engine replicas · store {args.store} · Ctrl-C stops"
    )
    stop.wait()
    console.print("stopping: draining replicas (owed memory updates commit)")
    serve.delete(APP_NAME)
    serve.shutdown()  # type: ignore[no-untyped-call]
    return 0
