"""Ledger: signed records in SQLite, anti-entropy sync, credits and statistics."""
