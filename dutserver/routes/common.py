"""A thin request/reply layer shared by every route module, under two ways in.

Handlers see a Request and give a Reply. A request comes either through ASGI (Starlette's
router, or any ASGI server: AsgiRequest watches for `http.disconnect` itself, since uvicorn does
not cancel a handler whose client went away), or on the direct path of dutserver/direct.py,
which calls an Endpoint's handler without ASGI. Direct handlers (@direct: polls, submits,
results) answer through a callback instead of returning, so the hot path needs no task per
request; Endpoint runs them on the ASGI path too.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Collection
from http import HTTPStatus
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dutserver import codec
from dutserver.errors import ApiError
from dutserver.tasks import Hangup

log = logging.getLogger("dutserver.http")
T = TypeVar("T")



JSON_TYPE = (b"content-type", b"application/json")
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
     b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
     b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
NO_STORE = (b"cache-control", b"no-store")  # API answers; the web files revalidate by ETag


class Reply:
    """What a handler answers: status, body bytes, content type and extra headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: bytes = b"",
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def ok(obj: dict[str, Any] | None = None, status: int = 200) -> Reply:
    """A JSON answer with "error": false first, as every successful API answer carries."""
    body = {"error": False}
    if obj:
        body.update(obj)
    return Reply(status, codec.dumps(body).encode(), b"application/json")


def raw_json(data: bytes, status: int = 200) -> Reply:
    return Reply(status, data, b"application/json")


class Request:
    """What a handler sees of a request, however it arrived: through ASGI (AsgiRequest) or on
    the direct path of dutserver/direct.py, which reads the whole body before the handler runs."""

    __slots__ = ("_query", "address", "headers", "method", "path_params", "query_string",
                 "state")

    def __init__(self, method: str, headers: list[tuple[bytes, bytes]], query_string: bytes,
                 state: dict[str, Any], address: str,
                 path_params: dict[str, Any] | None = None) -> None:
        self.method = method
        self.headers = headers  # names in lower case
        self.query_string = query_string
        self.state = state
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

    __slots__ = ("_watcher", "receive")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        client = scope.get("client")
        super().__init__(scope["method"], scope["headers"], scope["query_string"],
                         scope["state"], str(client[0]) if client else "unknown",
                         scope.get("path_params"))
        self.receive = receive
        self._watcher: asyncio.Task[None] | None = None

    async def body(self) -> bytes:
        limit = self.state["settings"].body_max_bytes
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


Handler = Callable[[Request], Awaitable[Reply]]
# A direct handler runs in the turn its request arrived in, with the whole body, and answers
# through `respond` with a Reply or the exception that refuses the request: now, or from a
# callback (a commit, a hand-off, a result). No coroutine, no task per request: the hot path
# (poll, submit, result). Mark it with @direct; Endpoint runs it on either path.
Respond = Callable[[Reply | BaseException], None]
DirectHandler = Callable[[Request, bytes, Respond], None]


_DIRECT: set[object] = set()


def direct(handler: DirectHandler) -> DirectHandler:
    _DIRECT.add(handler)
    return handler


def is_direct(handler: object) -> bool:
    return handler in _DIRECT


def after(awaitable: Awaitable[T], respond: Respond, then: Callable[[T], None]) -> None:
    """The slow way round for a direct handler (a database read first): runs awaitable as a
    task, then `then(its result)`; an exception from either is the answer."""
    def done(task: asyncio.Future[T]) -> None:
        failed = None if task.cancelled() else task.exception()
        if failed is not None:
            respond(failed)
            return
        try:
            then(task.result())
        except Exception as exc:
            respond(exc)
    asyncio.ensure_future(awaitable).add_done_callback(done)


def when_done(fut: asyncio.Future[Any], respond: Respond, reply: Reply) -> None:
    """Answers reply once fut is done, or the exception it failed with."""
    def done(f: asyncio.Future[Any]) -> None:
        respond(reply if f.cancelled() or f.exception() is None else f.exception())  # type: ignore[arg-type]
    fut.add_done_callback(done)


class Endpoint:
    """One path's handlers by method, as a raw ASGI app (Starlette treats it as such)."""

    def __init__(self, handlers: dict[str, Handler | DirectHandler], public: Collection[str] = (),
                 head: bool = True) -> None:
        """public: the methods anyone may call without credentials. head: answer HEAD like
        GET; off where GET has side effects (a HEAD /tasks must never take a task)."""
        self.handlers = dict(handlers)
        if head and "GET" in self.handlers and "HEAD" not in self.handlers:
            self.handlers["HEAD"] = self.handlers["GET"]
        self.public = frozenset(public)
        self._allow = ", ".join(m for m in self.handlers if m != "HEAD")
        # The protocol's direct path looks here first: a handler it can call in the same turn.
        self.direct_handlers: dict[str, DirectHandler] = {
            m: cast(DirectHandler, h) for m, h in self.handlers.items() if is_direct(h)}

    async def handle(self, req: Request, path: str) -> Reply:
        """The handler's reply, or the error it raised rendered in the error shape."""
        handler = self.handlers.get(req.method)
        try:
            if handler is None:
                raise ApiError(405, f"Method {req.method} not allowed; use {self._allow}",
                               {"Allow": self._allow})
            if is_direct(handler):
                answer: asyncio.Future[Reply | BaseException] = \
                    asyncio.get_running_loop().create_future()
                cast(DirectHandler, handler)(req, await req.body(), answer.set_result)
                outcome = await answer
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome
            return await cast(Handler, handler)(req)
        except Exception as exc:
            return error_reply(req, path, exc)
        finally:
            req.finish()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reply = await self.handle(AsgiRequest(scope, receive), scope["path"])
        await send_reply(send, reply, head=scope["method"] == "HEAD")


def error_reply(req: Request, path: str, exc: BaseException) -> Reply:
    """An exception as the answer: an ApiError in the error shape (logged once), anything
    else a 500 with its traceback in the log."""
    if isinstance(exc, ApiError):
        log.info("%s %s -> %d %s (from %s)", req.method, path, exc.status, exc.msg, req.address)
        return Reply(exc.status, exc.body(), b"application/json", exc.headers or None)
    log.error("%s %s failed", req.method, path, exc_info=exc)
    return Reply(500, b'{"error": true, "msg": "Internal server error"}', b"application/json")


async def send_reply(send: Send, reply: Reply, head: bool = False) -> None:
    headers = [(b"content-length", str(len(reply.body)).encode()), NO_STORE, *SECURITY_HEADERS]
    if reply.content_type:
        headers.append((b"content-type", reply.content_type))
    if reply.headers:
        headers.extend((k.lower().encode(), v.encode()) for k, v in reply.headers.items())
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else reply.body})


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_FIXED_HEADERS = b"".join(k + b": " + v + b"\r\n" for k, v in (NO_STORE, *SECURITY_HEADERS))


def render(reply: Reply, head: bool, keep_alive: bool) -> bytes:
    """The whole HTTP/1.1 response as one bytes object, with the same headers as send_reply:
    the direct path (dutserver/direct.py) writes it with one call."""
    if reply.headers:
        start = _head_start(reply, keep_alive)
    else:  # the usual answer: its head but for the length is one of a few, made once each
        key = (reply.status, reply.content_type, keep_alive)
        start = _HEAD_STARTS.get(key) or _HEAD_STARTS.setdefault(key, _head_start(reply, keep_alive))
    return b"%scontent-length: %d\r\n\r\n%s" % (start, len(reply.body), b"" if head else reply.body)


def _head_start(reply: Reply, keep_alive: bool) -> bytes:
    parts = [_STATUS_LINES.get(reply.status) or b"HTTP/1.1 %d \r\n" % reply.status,
             _FIXED_HEADERS]
    if reply.content_type:
        parts.append(b"content-type: " + reply.content_type + b"\r\n")
    if reply.headers:
        parts.extend(f"{k.lower()}: {v}\r\n".encode() for k, v in reply.headers.items())
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    return b"".join(parts)


_HEAD_STARTS: dict[tuple[int, bytes, bool], bytes] = {}


class SecurityHeaders:
    """Adds the security headers to responses that do not have them yet (Endpoints add their
    own as they build the response; static files and Starlette's own errors get them here)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        # A partial, not a closure (a reference cycle per request when compiled: native.py)
        await self.app(scope, receive, functools.partial(_send_with_headers, send))


async def _send_with_headers(send: Send, message: Message) -> None:
    if message["type"] == "http.response.start":
        headers = list(message.get("headers", ()))
        if SECURITY_HEADERS[1] not in headers:
            headers.extend(SECURITY_HEADERS)
        message["headers"] = headers
    await send(message)


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
