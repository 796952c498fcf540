"""HTTP routes: classic.py (PROTOCOL part 1), api.py (part 2), ops.py (health, openapi, files)."""

from dutserver import native

native.use_in_subpackage(__path__, "routes")
