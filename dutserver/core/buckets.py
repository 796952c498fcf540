"""Result buckets: a job's results grouped by what they said, largest group first.

"980 said A, 17 said B, 3 timed out": results are grouped by (error or not, exit status,
output) after a normalisation the user can switch off (trailing whitespace of each line;
optionally every run of digits, so that timestamps and counters do not split a group).
"""

from __future__ import annotations

import json
import re
from typing import Any

EXAMPLE_MAX = 2000  # characters of a bucket's example output
_DIGITS = re.compile(r"\d+")
_TRAILING = re.compile(r"[ \t\r]+$", re.MULTILINE)


def _text(result: dict[str, Any]) -> str:
    """What a result says: a command's output (and its stderr), an error's message, or the
    rest of the result as JSON for other task types."""
    if result.get("error") is True:
        return str(result.get("msg", ""))
    if "output" in result or "stderr" in result:
        out = str(result.get("output", ""))
        err = str(result.get("stderr", ""))
        return out + ("\n[stderr]\n" + err if err else "")
    rest = {k: v for k, v in result.items()
            if k not in ("error", "duration_s", "agent_version", "target")}
    return json.dumps(rest, sort_keys=True, ensure_ascii=False)


def _normal(text: str, normalize: bool, digits: bool) -> str:
    if normalize:
        text = _TRAILING.sub("", text).rstrip("\n")
    if digits:
        text = _DIGITS.sub("#", text)
    return text


def group(rows: list[tuple[str, str, str | None]], normalize: bool = True,
          digits: bool = False) -> list[dict[str, Any]]:
    """rows: (agent, task state, result JSON). Buckets, largest first, then by key."""
    found: dict[tuple[bool, Any, str], dict[str, Any]] = {}
    for agent, state, result_json in rows:
        try:
            result = json.loads(result_json) if result_json else {}
        except ValueError:
            result = {}
        if not isinstance(result, dict):
            result = {"value": result}
        error = state in ("failed", "expired", "cancelled") or result.get("error") is True
        if state in ("expired", "cancelled") and "msg" not in result:
            result = {"error": True, "msg": state}
        status = result.get("status_code")
        text = _text(result)
        key = (error, status, _normal(text, normalize, digits))
        bucket = found.get(key)
        if bucket is None:
            bucket = found[key] = {"error": error, "status_code": status, "state": state,
                                   "failed": error or (status not in (None, 0)),
                                   "example": text[:EXAMPLE_MAX], "agents": []}
        bucket["agents"].append(agent)
    ordered = sorted(found.values(), key=lambda b: (-len(b["agents"]), b["error"],
                                                     str(b["status_code"]), b["example"]))
    for number, bucket in enumerate(ordered):
        bucket["agents"].sort()
        bucket["bucket"] = number
        bucket["count"] = len(bucket["agents"])
    return ordered
