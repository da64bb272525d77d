"""How the Ray ingress ends a stream whose replica died (rxruntime/serving/ray/ingress.py): in each
API's own shape, so SDK clients raise or stop cleanly instead of waiting. The replica kill itself
is in tests/test_ray_serve.py (before the first token) and benchmarks/ray_failover.py (mid-stream)."""

from __future__ import annotations

import json

from rxruntime.serving.ray.ingress import failure_events, replica_failed


def _events(chunks: list[bytes]) -> list[tuple[str | None, str]]:
    out = []
    for block in b"".join(chunks).decode().split("\n\n"):
        if not block:
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines.get("event"), lines["data"]))
    return out


def test_a_responses_stream_ends_with_an_error_event_and_response_failed() -> None:
    message = replica_failed(RuntimeError("gone"))
    (error_kind, error), (failed_kind, failed) = _events(failure_events("/v1/responses", message))
    assert error_kind == "error" and json.loads(error)["code"] == "replica_failed"
    assert failed_kind == "response.failed"
    assert json.loads(failed)["response"]["error"] == {"code": "replica_failed", "message": message}
    assert "next turn runs on another replica" in message


def test_a_chat_stream_ends_with_an_error_chunk_and_done() -> None:
    (_, error), (_, done) = _events(failure_events("/v1/chat/completions", "the replica died"))
    assert json.loads(error)["error"]["code"] == "replica_failed"
    assert done == "[DONE]"
