"""OpenAI's message lists, read once for every route: Responses ``input``, Conversations ``items``,
Chat Completions ``messages``.

The three APIs send the same thing, a list of role-tagged messages, and one reader (``_read``)
walks it for all of them. Where they differ is written down as data (:class:`_Rules`), not as
three loops: whether items carry OpenAI's ``type``, whether an assistant message may appear,
whether system text must come first, and what a second user message in a row means. Every bad
message is a 400 naming its place (``messages[2].content``, ``input[0].role``...).

rxruntime keeps no transcript: system and developer text initialises memory, (user, assistant)
pairs are written to memory as past turns, and the last user message is the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from rxruntime.serving.http.errors import bad_field

Pair = tuple[str, str]  # (user, assistant): one past turn


@dataclass(frozen=True)
class _Rules:
    """How one API's message list differs from the others'."""

    field: str  # the request field: its name starts every error's param
    typed: bool  # items carry ``type``, which must be "message" (Responses, Conversations)
    roles: str  # the error for a role this API does not take
    assistant: bool  # assistant messages are earlier answers (Responses takes the new message only)
    tool_calls: bool  # an assistant's ``tool_calls`` are refused by name (Chat Completions)
    content_optional: bool  # a missing ``content`` reads as "" (Chat Completions)
    system_first: str | None  # the error for system text after the first user message (None: anywhere)
    repeat_user: Literal["refuse", "pair", "join"]  # a user message while one is unanswered


_INPUT = _Rules(
    field="input",
    typed=True,
    roles="expected 'user' (or 'system'/'developer' for a new conversation)",
    assistant=False,
    tool_calls=False,
    content_optional=False,
    system_first=None,
    repeat_user="refuse",
)
_ITEMS = _Rules(
    field="items",
    typed=True,
    roles="expected 'user', 'assistant', 'system' or 'developer'",
    assistant=True,
    tool_calls=False,
    content_optional=False,
    system_first="system and developer messages go before the first user message",
    repeat_user="pair",  # a user message with no answer is a past turn whose answer was empty
)
_MESSAGES = _Rules(
    field="messages",
    typed=False,
    roles="expected 'system', 'developer', 'user' or 'assistant'",
    assistant=True,
    tool_calls=True,
    content_optional=True,
    system_first="system messages are only read before the first user message",
    repeat_user="join",  # consecutive user messages read as one
)


@dataclass
class Transcript:
    """A message list as memory sees it."""

    system: str | None  # system and developer text, joined: initialises memory
    pairs: list[Pair]  # earlier (user, assistant) turns, in order
    user: str | None  # the last user message, with no answer after it


def parse_input(value: Any) -> tuple[str, str | None]:
    """Responses ``input``: (the user's message, instructions from system/developer items if any)."""
    if isinstance(value, str):
        if not value:
            raise bad_field("input", "must not be empty")
        return value, None
    if not isinstance(value, list) or not value:
        raise bad_field("input", "expected a string or a list of message items")
    transcript = _read(value, _INPUT)
    if not transcript.user:
        raise bad_field("input", "needs one non-empty user message")
    return transcript.user, transcript.system


def parse_items(value: Any) -> tuple[str | None, list[Pair]]:
    """Conversations ``items``: (memory_init text from system/developer items, the pairs to replay)."""
    if value is None:
        return None, []
    if not isinstance(value, list):
        raise bad_field("items", "expected a list of message items")
    transcript = _read(value, _ITEMS)
    if transcript.user is not None:
        transcript.pairs.append((transcript.user, ""))
    return transcript.system, transcript.pairs


def parse_messages(value: Any) -> tuple[str | None, list[Pair], str]:
    """Chat Completions ``messages``: system* then alternating user / assistant, ending with the
    user's new message. Returns (system text, earlier pairs, the query)."""
    if not isinstance(value, list) or not value:
        raise bad_field("messages", "expected a non-empty list of messages")
    transcript = _read(value, _MESSAGES)
    if not transcript.user:
        raise bad_field(f"messages[{len(value) - 1}]", "the last message must be the user's (non-empty)")
    return transcript.system, transcript.pairs, transcript.user


def message_text(content: Any, param: str) -> str:
    """The text of a message's ``content``: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                raise bad_field(f"{param}[{i}]", "only text parts are supported (type 'input_text' or 'text')")
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_field(f"{param}[{i}].text", "expected a string")
            texts.append(text)
        return "\n".join(texts)
    raise bad_field(param, "expected a string or a list of text parts")


def _read(items: list[Any], rules: _Rules) -> Transcript:
    """Walk a message list under one API's rules; the first bad message raises a 400 naming it."""
    system: list[str] = []
    pairs: list[Pair] = []
    user: str | None = None
    for i, item in enumerate(items):
        param = f"{rules.field}[{i}]"
        if rules.typed:
            if not isinstance(item, dict) or item.get("type", "message") != "message":
                raise bad_field(param, "only message items are supported")
        elif not isinstance(item, dict):
            raise bad_field(param, "expected a message object")
        role = item.get("role")
        content = item.get("content")
        text = "" if content is None and rules.content_optional else message_text(content, f"{param}.content")
        if role in ("system", "developer"):
            if rules.system_first is not None and (pairs or user is not None):
                raise bad_field(f"{param}.role", rules.system_first)
            system.append(text)
        elif role == "user":
            if user is None:
                user = text
            elif rules.repeat_user == "join":
                user = f"{user}\n{text}"
            elif rules.repeat_user == "pair":
                pairs.append((user, ""))
                user = text
            else:
                raise bad_field(
                    param, "send one user message per request: the conversation's memory holds the earlier ones"
                )
        elif role == "assistant" and rules.assistant:
            if rules.tool_calls and item.get("tool_calls"):
                raise bad_field(f"{param}.tool_calls", "tool calls are not supported")
            pairs.append((user or "", text))
            user = None
        else:
            raise bad_field(f"{param}.role", rules.roles)
    return Transcript("\n".join(system) or None, pairs, user)
