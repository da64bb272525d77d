"""The official ``openai`` SDK, unchanged, talking to rxruntime's HTTP front.

Starts the front on a free loopback port (on a thread; ``rxrt serve --http`` does the same from a
shell), then uses three APIs a stateless server also offers, but answers them from the STM:

* Responses on a conversation: each request sends only the new message;
* a streamed response, which ends with our memory events;
* Chat Completions, where the client resends its history and the server replays or reuses it.

Run (needs the ``http`` extra and ``openai``)::

    python examples/openai_sdk.py
"""

from __future__ import annotations

from _common import engine_from_args
from openai import OpenAI

from rxruntime.serving.http.app import create_app
from rxruntime.serving.http.serve import ThreadedServer


def main() -> None:
    engine, _ = engine_from_args(__doc__ or "")
    with engine, ThreadedServer(create_app(engine)) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="not-needed-without---api-key")

        # `seed` (our extension) fixes the conversation's starting memory, so this prints the same every run
        conv = client.conversations.create(metadata={"example": "openai_sdk"}, extra_body={"seed": 0})
        for query in ["I live in Lisbon.", "What is 3 plus 5?", "Where do I live?"]:
            response = client.responses.create(model="rxt", input=query, conversation=conv.id)
            print(f"> {query}\n  {response.output_text}  (input tokens: {response.usage.input_tokens})")  # type: ignore[union-attr]

        print("> What is my name?  (streamed, after 'My name is Julia.')")
        client.responses.create(model="rxt", input="My name is Julia.", conversation=conv.id)
        for event in client.responses.create(model="rxt", input="What is my name?", conversation=conv.id, stream=True):
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
            elif event.type.startswith("rxrt.memory."):
                print(f"\n  [{event.type}: STM v{event.model_dump()['stm_version']}]", end="")
        print()

        history = [
            {"role": "user", "content": "My name is Julia."},
            {"role": "assistant", "content": "Nice to meet you, Julia."},
            {"role": "user", "content": "What is my name?"},
        ]
        reply = client.chat.completions.create(model="rxt", messages=history)  # type: ignore[arg-type]
        replayed = reply.model_dump()["usage"]["rxrt"]
        print(
            f"chat: {reply.choices[0].message.content}  (history {replayed['history_cache']}, "
            f"{replayed['replayed_turns']} turn replayed)"
        )


if __name__ == "__main__":
    main()
