"""Discrete-event simulator of the swarm protocol."""
