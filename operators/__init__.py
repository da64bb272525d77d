"""Pipeable reactivex operators over interaction events (import name: ``rxruntime.operators``).

Each operator transforms the events it is about and passes every other event through, so they
chain into one stream::

    queries.pipe(tokenize(conv), generate(conv), detokenize(tok), encode(conv), update_memory(conv))

which is what :func:`interaction` does, one query at a time.
"""

from .detokenize import detokenize
from .encode import encode
from .generate import generate
from .interaction import interaction, sampling_params
from .tokenize import Query, tokenize
from .update_memory import update_memory

__all__ = ["Query", "detokenize", "encode", "generate", "interaction", "sampling_params", "tokenize", "update_memory"]
