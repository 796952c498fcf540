"""dutserver: a small, fast remote-control server."""

__version__ = "1.0.0"
