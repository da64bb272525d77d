"""Stop sequences matched on the answer's text as it streams, never emitted.

The matcher holds back only the tail of the text that could still begin a stop sequence (the
longest suffix that is a prefix of one), so a client sees every other character as soon as it is
decoded. Once a stop sequence appears, the text before it is the whole answer: the turn is ended
and that text, exactly, is what the memory update reads (``turns.py``).
"""

from __future__ import annotations

from typing import Any

from rxruntime.serving.http.errors import bad_field

MAX_STOPS = 4  # OpenAI's limit


def parse_stop(value: Any, name: str = "stop") -> tuple[str, ...]:
    """``stop``: null, a string, or a list of up to 4 non-empty strings (``[]`` is none)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_field(name, "expected a string or a list of strings")
    if len(items) > MAX_STOPS:
        raise bad_field(name, f"at most {MAX_STOPS} stop sequences, got {len(items)}")
    if any(not s for s in items):
        raise bad_field(name, "a stop sequence cannot be empty")
    return tuple(dict.fromkeys(items))


class StopMatcher:
    """Feed text pieces; get back the text safe to show, until a stop sequence matches."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._pending = ""
        self.shown = ""  # everything released so far
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text now safe to show (possibly empty); after a match, the text before it."""
        if self.stopped:
            return ""
        text = self._pending + piece
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            self.stopped = True
            self._pending = ""
            return self._release(text[:cut])
        hold = self._held(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return self._release(text[: len(text) - hold])

    def flush(self) -> str:
        """At the end of an answer with no match: the held-back tail is part of the answer."""
        tail, self._pending = self._pending, ""
        return self._release(tail) if not self.stopped else ""

    def _held(self, text: str) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _release(self, text: str) -> str:
        self.shown += text
        return text
