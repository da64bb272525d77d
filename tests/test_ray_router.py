"""Which key the Ray ingress routes a request by (rxruntime/serving/ray/router.py): a
conversation's every request by its id, a stateless chat by its unchanging head, nothing else."""

from __future__ import annotations

import json

from rxruntime.serving.ray.router import Route, route_for


def _body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_conversations_turns_route_by_its_id_however_they_name_it() -> None:
    by_id = route_for("POST", "/v1/responses", _body(input="hi", conversation="conv_abc"))
    by_object = route_for("POST", "/v1/responses", _body(input="hi", conversation={"id": "conv_abc"}))
    by_previous = route_for("POST", "/v1/responses", _body(input="hi", previous_response_id="resp_abc_3"))
    assert by_id == by_object == by_previous == Route("conv_abc", "conv_abc")


def test_a_new_conversation_goes_anywhere_and_takes_no_lease() -> None:
    assert route_for("POST", "/v1/responses", _body(input="hi")) == Route()
    assert route_for("POST", "/v1/conversations", b"") == Route()


def test_conversation_routes_share_the_key_and_only_delete_takes_the_lease() -> None:
    assert route_for("GET", "/v1/conversations/conv_abc", b"") == Route("conv_abc", None)
    assert route_for("POST", "/v1/conversations/conv_abc", b"{}") == Route("conv_abc", None)
    assert route_for("DELETE", "/v1/conversations/conv_abc", b"") == Route("conv_abc", "conv_abc")


def test_a_chat_routes_by_its_history_up_to_the_first_user_message() -> None:
    head = [{"role": "system", "content": "I live in Lisbon."}, {"role": "user", "content": "Hi"}]
    first = route_for("POST", "/v1/chat/completions", _body(messages=head))
    later = route_for(
        "POST",
        "/v1/chat/completions",
        _body(messages=[*head, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Where?"}]),
    )
    other = route_for("POST", "/v1/chat/completions", _body(messages=[{"role": "user", "content": "Hey"}]))
    assert first.key is not None and first == later and first.conversation is None
    assert other.key != first.key


def test_bad_bodies_and_other_routes_route_anywhere_and_never_raise() -> None:
    for method, path, body in [
        ("POST", "/v1/responses", b"{not json"),
        ("POST", "/v1/responses", b"[1, 2]"),
        ("POST", "/v1/responses", _body(previous_response_id="resp_nope")),
        ("POST", "/v1/chat/completions", _body(messages="nope")),
        ("GET", "/v1/models", b""),
        ("GET", "/metrics", b""),
        ("GET", "/v1/conversations/a/b", b""),
    ]:
        assert route_for(method, path, body) == Route(), (method, path, body)
