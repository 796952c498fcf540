"""The one error type of the core: a refusal with an HTTP-like status and a message.

It says what is wrong, not how it looks on the wire: dutserver/http/answer.py renders it in our
shape {"error": true, "msg": …}; another protocol's routes render it in theirs.
"""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses, with `status` (an HTTP status) and `msg` for a human."""

    def __init__(self, status: int, msg: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.headers = headers or {}


def unknown_agent(name: str) -> ApiError:
    return ApiError(404, f"Unknown agent: {name}")
