"""rxruntime: serve Reactive Transformer models as event streams."""

__version__ = "0.1.0"
