"""JSON out, fast: the C encoder built once, not once per call.

json.dumps builds a new C encoder object for every call; on the hot path (the task for the
agent, the result for the submitter, the rows for the database) that is a third of its cost.
Output is byte for byte what json.dumps gives with the same separators.
"""

from __future__ import annotations

from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

# markers=None: no cycle check (everything encoded here came from JSON, which has no cycles).
_spaced = c_make_encoder(None, None, encode_basestring_ascii, None, ": ", ", ", False, False,
                         True)
_compact = c_make_encoder(None, None, encode_basestring_ascii, None, ":", ",", False, False,
                          True)


def dumps(obj: Any) -> str:
    """json.dumps(obj)."""
    return "".join(_spaced(obj, 0))


def compact(obj: Any) -> str:
    """json.dumps(obj, separators=(",", ":"))."""
    return "".join(_compact(obj, 0))
