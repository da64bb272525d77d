"""The supervised training curriculum (stages 0-4), its recipes and its memory evaluations.

``trainer`` drives the stages (``joint``, ``memory_pretrain``, ``memory_aware``) from a ``recipe``;
``sources`` says what each stage reads, from ``data/`` (the synthetic dialogue generators and the
corpus loaders); ``mrqbench`` and ``people_eval`` are ``rxrt eval memory``; ``tensorbleu`` is the
batched BLEU reward. The model itself lives in ``rxruntime.models``, which never imports this.
"""
