"""The one error type of the API and its one shape: {"error": true, "msg": …}."""

from __future__ import annotations

import json


class ApiError(Exception):
    """A request the server refuses; rendered as {"error": true, "msg": msg} with `status`."""

    def __init__(self, status: int, msg: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.headers = headers or {}

    def body(self) -> bytes:
        return json.dumps({"error": True, "msg": self.msg}).encode()


def unknown_agent(name: str) -> ApiError:
    return ApiError(404, f"Unknown agent: {name}")
