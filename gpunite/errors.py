"""The base of every error gpunite reports to a user as one line (each layer subclasses it)."""


class GpuniteError(Exception):
    """An error whose message says what went wrong and what to do next; shown without a traceback."""
