"""HTTP routes: classic.py (PROTOCOL part 1), api.py (part 2), ops.py (health, openapi, files)."""
