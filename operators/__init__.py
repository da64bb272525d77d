"""Pipeable reactivex operators over interaction events (import name: ``rxruntime.operators``)."""
