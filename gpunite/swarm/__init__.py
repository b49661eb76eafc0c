"""Swarm: hivemind wiring, membership, work assignment, sharded aggregation and state sync."""
