"""dutserver: a small, fast remote-control server."""

from dutserver import native

__version__ = "1.0.0"

native.use(__path__)  # the compiled hot path, if built from these very sources (native.py)
