"""``rxrt serve --http`` as a user runs it: a subprocess, HTTP and zmq on one engine, Ctrl-C stops it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import openai
import zmq

from .http_server import ASK_NAME, JULIA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            return reply.status, json.loads(reply.read())["status"]
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["status"]
    except OSError:
        return 0, "down"


def test_serve_http_and_zmq_from_the_command_line(tmp_path: Path) -> None:
    http_port, zmq_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{http_port}"
    keys = tmp_path / "keys"
    keys.write_text("sk-file\n")
    command = [
        sys.executable,
        "-m",
        "rxruntime.cli",
        "serve",
        "--model",
        "small",
        "--http",
        f"127.0.0.1:{http_port}",
        "--bind",
        f"tcp://127.0.0.1:{zmq_port}",
        "--store",
        f"sqlite:///{tmp_path / 'stm.db'}",
        "--api-key",
        "sk-flag",
        "--api-key-file",
        str(keys),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while (state := _health(url)) != (200, "ready"):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        for key in ("sk-flag", "sk-file"):
            c = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
            conv = c.conversations.create()
            c.responses.create(model="rxt", input=JULIA, conversation=conv.id)
            assert "Julia" in c.responses.create(model="rxt", input=ASK_NAME, conversation=conv.id).output_text
        # the zmq front serves the same engine
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{zmq_port}")
        sock.send(msgpack.packb({"op": "ping", "rid": 1}))
        assert sock.poll(20_000), "no zmq reply"
        reply = msgpack.unpackb(sock.recv(), raw=False)
        sock.close()
        ctx.term()
        assert reply["rid"] == 1 and "ok" in reply
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, output
    assert "Application shutdown complete" in output
