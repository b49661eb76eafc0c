"""Serving: the host role, an OpenAI-compatible API, quotas and streaming."""
