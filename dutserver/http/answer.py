"""What goes back: the Reply a handler gives, the one error renderer, and the bytes on the wire.

Every error any client of ours sees is made by `error_reply`: a handler's ApiError, an
exception nobody expected (500, its traceback in the log), an unknown path, a malformed
request, a refused WebSocket upgrade. `render` (the direct path, one write) and `send_reply`
(ASGI) put the same headers on every answer.
"""

from __future__ import annotations

import functools
import json
import logging
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dutserver.core import codec
from dutserver.core.errors import ApiError

log = logging.getLogger("dutserver.http")

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


def error_body(msg: str) -> bytes:
    """Our error shape, {"error": true, "msg": …}: made here and nowhere else."""
    return json.dumps({"error": True, "msg": msg}).encode()


_INTERNAL = error_body("Internal server error")


def error_reply(exc: BaseException) -> Reply:
    """An exception as the answer: an ApiError with its status, message and headers; anything
    else a 500 that says nothing of the cause (the caller logs it)."""
    if isinstance(exc, ApiError):
        return Reply(exc.status, error_body(exc.msg), b"application/json", exc.headers or None)
    return Reply(500, _INTERNAL, b"application/json")


def refused(method: str, path: str, address: str, exc: BaseException) -> Reply:
    """error_reply, logged once: an ApiError as one info line, anything else with its
    traceback."""
    if isinstance(exc, ApiError):
        log.info("%s %s -> %d %s (from %s)", method, path, exc.status, exc.msg, address)
    else:
        log.error("%s %s failed", method, path, exc_info=exc)
    return error_reply(exc)


def reply_headers(reply: Reply) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-length", str(len(reply.body)).encode()), NO_STORE, *SECURITY_HEADERS]
    if reply.content_type:
        headers.append((b"content-type", reply.content_type))
    if reply.headers:
        headers.extend((k.lower().encode(), v.encode()) for k, v in reply.headers.items())
    return headers


async def send_reply(send: Send, reply: Reply, head: bool = False) -> None:
    await send({"type": "http.response.start", "status": reply.status,
                "headers": reply_headers(reply)})
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


async def refuse_websocket(scope: Scope, receive: Receive, send: Send, exc: ApiError) -> None:
    """A WebSocket upgrade nothing here accepts: answered as an HTTP error in our shape (the
    ASGI denial response, where the server offers it), else closed as a policy violation."""
    log.info("WebSocket %s -> %d %s", scope.get("path"), exc.status, exc.msg)
    if "websocket.http.response" in scope.get("extensions", {}):
        reply = error_reply(exc)
        await send({"type": "websocket.http.response.start", "status": reply.status,
                    "headers": reply_headers(reply)})
        await send({"type": "websocket.http.response.body", "body": reply.body})
    else:
        await send({"type": "websocket.close", "code": 1008})
