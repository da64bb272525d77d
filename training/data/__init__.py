"""The training and evaluation data: synthetic dialogues and the loaders of local corpora.

``dialogues`` (the turn types and the template generator), ``people`` (dialogues the way people
talk) with its ``phrasings``, ``values``, ``chitchat`` and ``grammar``; ``loaders`` (JSONL and
Hugging Face ``datasets`` files). Pure data: nothing here builds or runs a model.
"""
