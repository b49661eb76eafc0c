"""The data layer's error: bad corpus files, corrupt shards or a missing index, in one actionable line."""

from gpunite.errors import GpuniteError


class DataError(GpuniteError, ValueError):
    """Data that cannot be read or trusted; the message names the file (and line) and says what to do."""
