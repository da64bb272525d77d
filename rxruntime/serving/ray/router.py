"""Session affinity under Ray Serve: which key a request is routed by, and how often it pays off.

A replica that served a conversation's last turn holds its STM warm (in device memory, current);
any other replica must first read it from Redis. So the ingress routes every request of a
conversation by the conversation id, through Serve's model multiplexing: the id is the request's
``multiplexed_model_id``, the replica "loads" it by marking it warm, and Serve's router sends the
next request with that id to a replica that reported it, while that replica lives and has room.
A new conversation (no id yet) goes wherever Serve's power-of-two-choices router puts it; the
replica then registers the id it created, so the second turn comes back to it.

Chat Completions requests carry no id: they are keyed by a hash of the history up to the first
user message, which a stateless client resends unchanged every turn.

``AffinityStats`` counts, for every turn of an existing conversation, whether the replica that got
it already held the conversation open and current (a hit) or had to read it from the store (a
miss); the counts live in Redis, so ``/metrics`` of any replica shows the deployment's hit rate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rxruntime.serving.http.registry import PREFIX

_CONVERSATION_PATH = "/v1/conversations/"


@dataclass(frozen=True)
class Route:
    """How to route one request: ``key`` for affinity (None: any replica) and whether it is a turn
    of an existing conversation (``conversation``: then the replica takes its lease)."""

    key: str | None = None
    conversation: str | None = None


def route_for(method: str, path: str, body: bytes) -> Route:
    """The routing of a request, from its method, path and (JSON) body; never raises."""
    if path.startswith(_CONVERSATION_PATH):
        cid = path[len(_CONVERSATION_PATH) :].strip("/")
        if not cid or "/" in cid:
            return Route()
        return Route(cid, cid if method == "DELETE" else None)
    if method != "POST" or path not in ("/v1/responses", "/v1/chat/completions"):
        return Route()
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return Route()
    if not isinstance(data, dict):
        return Route()
    if path == "/v1/chat/completions":
        return Route(_chat_key(data.get("messages")))
    conversation = _conversation_of(data)
    return Route(conversation, conversation)


def _conversation_of(body: dict[str, Any]) -> str | None:
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if isinstance(conversation, str) and conversation:
        return conversation
    previous = body.get("previous_response_id")
    if isinstance(previous, str) and previous.startswith("resp_"):
        suffix, _, turn = previous.removeprefix("resp_").rpartition("_")
        if suffix and turn.isdigit():
            return f"{PREFIX}_{suffix}"
    return None


def _chat_key(messages: Any) -> str | None:
    """A chat's key: its messages up to the first user message, which every later request repeats."""
    if not isinstance(messages, list):
        return None
    head: list[Any] = []
    for message in messages:
        head.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            digest = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()
            return f"chat_{digest[:32]}"
    return None


class AffinityStats(Collector):
    """Deployment-wide hit and miss counts in one Redis hash; a Prometheus collector of them."""

    def __init__(self, client: Any, key: str = "rxrt:affinity") -> None:
        self._redis = client
        self._key = key

    def record(self, hit: bool) -> None:
        self._redis.hincrby(self._key, "hit" if hit else "miss", 1)

    def counts(self) -> tuple[int, int]:
        raw = self._redis.hmget(self._key, ["hit", "miss"])
        return int(raw[0] or 0), int(raw[1] or 0)

    def collect(self) -> Any:
        try:
            hits, misses = self.counts()
        except Exception:  # Redis down: the scrape still answers with the rest
            return
        turns = CounterMetricFamily(
            "rxrt_affinity_turns",
            "Turns of existing conversations, all replicas: hit (the replica held the STM warm) or miss",
            labels=["result"],
        )
        turns.add_metric(["hit"], hits)
        turns.add_metric(["miss"], misses)
        yield turns
        ratio = GaugeMetricFamily("rxrt_affinity_hit_ratio", "hits / (hits + misses), all replicas")
        ratio.add_metric([], hits / (hits + misses) if hits + misses else 0.0)
        yield ratio
