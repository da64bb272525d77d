"""``rxrt serve``: serve a model to many conversations over zmq + msgpack (docs/protocol.md)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("serve", help="serve a model over zmq (ROUTER socket, msgpack frames)")
    p.add_argument("--model", default="default", help="model directory, hub id, or 'default' (the embedded model)")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="zmq address to bind (default %(default)s)")
    p.add_argument(
        "--store",
        default="sqlite:///rxrt-stm.db",
        help="where STMs persist: sqlite:///file.db (default %(default)s), redis://host:port/db, memory://",
    )
    p.add_argument("--max-batch", type=int, default=64, help="conversations decoded together (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from rich.console import Console

    import rxruntime
    from rxruntime.models.errors import ConfigError
    from rxruntime.serving.auth import ServerKeys
    from rxruntime.serving.zmq_server import Server, is_loopback
    from rxruntime.stores import open_store

    console = Console(highlight=False)
    keys = ServerKeys.load(args.keys) if args.keys else None
    if keys is None and not args.insecure and not is_loopback(args.bind):  # before loading the model
        raise ConfigError(f"refusing to serve {args.bind} without --keys (rxrt keygen DIR); --insecure overrides")
    store = open_store(args.store)
    stop = threading.Event()
    with rxruntime.load(args.model, device=args.device, max_batch=args.max_batch, store=store) as engine:
        server = Server(
            engine,
            args.bind,
            keys=keys,
            insecure=args.insecure,
            max_message_bytes=args.max_message_bytes,
            peer_timeout_s=args.peer_timeout,
        ).start()
        auth = f"CURVE keys from {args.keys}" if keys else "no authentication"
        console.print(
            f"rxrt serve: {server.endpoint} · {auth} · store {args.store} · device {engine.device} · Ctrl-C stops"
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        console.print("stopping: finishing owed memory updates")
        server.stop()
    store.close()
    return 0
