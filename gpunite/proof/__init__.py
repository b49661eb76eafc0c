"""Proof of training: trails, cheap checks, audit replay and verifier selection."""
