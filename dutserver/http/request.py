"""What a handler sees of a request, however it arrived: through ASGI (AsgiRequest), or on the
direct path below ASGI (dutserver/http/direct.py), which reads the whole body before the handler
runs. Also the parsing every route shares: JSON bodies, query parameters, form fields.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope

from dutserver.core.errors import ApiError
from dutserver.core.services import Services
from dutserver.core.waiting import Hangup


class Request:
    """What a handler sees of a request, however it arrived: through ASGI (AsgiRequest) or on
    the direct path of dutserver/direct.py, which reads the whole body before the handler runs."""

    __slots__ = ("_query", "address", "headers", "method", "path_params", "query_string",
                 "services")

    def __init__(self, method: str, headers: list[tuple[bytes, bytes]], query_string: bytes,
                 services: Services, address: str,
                 path_params: dict[str, Any] | None = None) -> None:
        self.method = method
        self.headers = headers  # names in lower case
        self.query_string = query_string
        self.services = services
        self.address = address
        self.path_params = path_params if path_params is not None else {}
        self._query: dict[str, str] | None = None

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            raw = self.query_string.decode("latin-1")
            q: dict[str, str] = {}
            if "&" not in raw and "%" not in raw and "+" not in raw:  # one plain parameter
                if raw:
                    key, _, value = raw.partition("=")
                    q[key] = value
                self._query = q
                return q
            if "%" in raw or "+" in raw:
                pairs = parse_qsl(raw, keep_blank_values=True)
            else:  # nothing to unquote: what parse_qsl gives, at a fraction of its cost
                pairs = [part.partition("=")[::2] for part in raw.split("&") if part]
            for key, value in pairs:
                q.setdefault(key, value)  # the first of repeated parameters counts
            self._query = q
        return self._query

    async def body(self) -> bytes:
        """The whole body, refused with 413 past the configured limit."""
        raise NotImplementedError

    def gone(self) -> Hangup:
        """What says when the client disconnects (call after reading the body)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once the handler has answered."""

    async def json(self) -> Any:
        return parse_json(await self.body())

    async def json_object(self, what: str = "body") -> dict[str, Any]:
        value = await self.json()
        if not isinstance(value, dict):
            raise ApiError(400, f"Invalid JSON: the {what} must be a JSON object")
        return value

    async def fields(self) -> dict[str, Any]:
        """Query parameters, overlaid by a form or JSON object body (for /login, /agents)."""
        values: dict[str, Any] = dict(self.query)
        if self.method in ("GET", "HEAD"):
            return values
        data = await self.body()
        if not data.strip():
            return values
        if data.lstrip()[:1] == b"{":
            try:
                body = parse_json(data)
            except ApiError:
                raise ApiError(400, "Invalid JSON: the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "Invalid JSON: the body must be a JSON object")
            values.update(body)
        else:
            for key, value in parse_qsl(data.decode("utf-8", "replace"), keep_blank_values=True):
                values.setdefault(key, value)
        return values


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body too large (limit {limit} bytes)")


class AsgiRequest(Request):
    """A request that came through ASGI: the body and the disconnect arrive by receive()."""

    __slots__ = ("_body", "_watcher", "receive")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        client = scope.get("client")
        super().__init__(scope["method"], scope["headers"], scope["query_string"],
                         scope["state"]["services"], str(client[0]) if client else "unknown",
                         scope.get("path_params"))
        self.receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._body: bytes | None = None

    async def body(self) -> bytes:
        if self._body is None:
            self._body = await self._read_body()
        return self._body

    async def _read_body(self) -> bytes:
        limit = self.services.settings.body_max_bytes
        declared = self.header(b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() \
                and int(declared) > limit:
            raise too_large(limit)
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "Client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def gone(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        async def watch() -> None:
            while (await self.receive())["type"] != "http.disconnect":
                pass

        def settle(_: object) -> None:
            if not fut.done():
                fut.set_result(None)

        self._watcher = loop.create_task(watch())
        self._watcher.add_done_callback(settle)
        return fut

    def finish(self) -> None:
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()


def parse_json(data: bytes) -> Any:
    """A request body as JSON, or 400 with what is wrong with it."""
    try:
        # json.loads would build a new decoder for every call that passes parse_constant.
        # An object that starts as UTF-8 does ("{" and no NUL after it) is what
        # json.detect_encoding would call UTF-8: no need to ask it.
        if data[:1] == b"{" and data[1:2] != b"\x00":
            # JSONDecoder.decode without its wrappers: an object from the first character
            text = data.decode("utf-8", "surrogatepass")
            try:
                value, end = _SCAN(text, 0)
            except StopIteration as exc:
                raise json.JSONDecodeError("Expecting value", text, exc.value) from None
            if end != len(text):
                end = _JSON_SPACE(text, end).end()  # type: ignore[union-attr]  # matches ""
                if end != len(text):
                    raise json.JSONDecodeError("Extra data", text, end)
            return value
        return _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except RecursionError:
        raise ApiError(400, "Invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"Invalid JSON: {exc}") from None


def _not_json(name: str) -> Any:
    # Python's json accepts NaN and Infinity; browsers' JSON.parse does not, so one such value
    # stored in a task would break every history view that lists it.
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_not_json)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_JSON_SPACE = re.compile(r"[ \t\n\r]*").match  # what JSONDecoder.decode skips after the value


def int_param(req: Request, name: str, default: int | None = None, minimum: int = 0,
              maximum: int | None = None) -> int | None:
    raw = req.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"Invalid {name} parameter: not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and {maximum}" if maximum is not None else ""
        raise ApiError(400, f"Invalid {name} parameter: must be between {minimum}{upper}")
    return value


def float_param(req: Request, name: str, default: float, maximum: float) -> float:
    raw = req.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"Invalid {name} parameter: not a number") from None
    if not (0 < value <= maximum):  # also refuses nan and inf
        raise ApiError(400, f"Invalid {name} parameter: must be above 0 and at most {maximum:g}")
    return value
