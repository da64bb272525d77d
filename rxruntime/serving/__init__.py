"""Serving: the fronts that put an engine on the network (zmq here; HTTP beside it)."""
