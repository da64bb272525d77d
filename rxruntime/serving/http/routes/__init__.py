"""One module per API: ``responses``, ``conversations``, ``chat_completions``, and ``status``
(``/health``, ``/v1/models``, ``/metrics``). Each handler takes ``(Context, Request, owner)``."""
