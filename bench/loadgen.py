"""A cheap HTTP/1.1 keep-alive client for load generation.

The generator must cost the measured server as little as possible and itself as little CPU as
possible, so this is neither httpx nor aiohttp: one asyncio Protocol per connection, requests
written as one pre-formatted bytes object, responses parsed just far enough to know the status,
the headers and where the body ends (Content-Length, chunked, or connection close).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class ProtocolError(Exception):
    """The peer sent something that is not an HTTP/1.1 response we can frame."""


class Response:
    """One response. Headers are parsed only when asked for: the hot path needs status and body."""

    __slots__ = ("_headers", "body", "close", "head", "status")

    def __init__(self, status: int, head: bytes, body: bytes, close: bool) -> None:
        self.status = status
        self.head = head  # the raw status line and header lines, without the blank line
        self.body = body
        self.close = close  # the server said `Connection: close`
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Lower-case names; a repeated header keeps its last value."""
        if self._headers is None:
            self._headers = {}
            for line in self.head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                self._headers[name.strip().lower().decode("latin-1")] = (
                    value.strip().decode("latin-1"))
        return self._headers

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body[:60]!r})"


@dataclass(frozen=True, slots=True)
class Target:
    """Where the generator sends requests: parsed once from a URL such as http://127.0.0.1:8080/base."""

    host: str
    port: int
    tls: bool
    base_path: str  # no trailing slash; "" for a server at the root

    @classmethod
    def from_url(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


# A body of unknown length runs to the connection's end (HTTP/1.1 section 6.3, last rule).
_UNTIL_CLOSE = -1


def _header_value(lower_head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lower case, with the colon) in a lower-cased head, or None."""
    at = lower_head.find(b"\r\n" + name)
    if at < 0:
        return None
    start = at + 2 + len(name)
    stop = lower_head.find(b"\r\n", start)
    return lower_head[start:stop if stop >= 0 else len(lower_head)].strip()


class _ResponseParser:
    """Incremental parser: feed() bytes, take complete responses from done."""

    __slots__ = (
        "_body_start",
        "_chunked",
        "_close",
        "_head",
        "head_only",
        "_length",
        "_status",
        "buf",
        "done",
    )

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done: list[Response] = []
        self._status = 0
        self._head = b""  # empty while no head is parsed
        self._close = False
        self._body_start = 0
        self._length = 0
        self._chunked = False
        self.head_only = False

    def feed(self, data: bytes) -> None:
        if not self.buf and not self._head and self._feed_whole(data):
            return
        self.buf += data
        while self._step():
            pass

    def _feed_whole(self, data: bytes) -> bool:
        """Fast path for the usual case, one whole Content-Length response in one read: no
        buffer copies. False (state untouched) for anything else, which takes the general path."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        self._parse_head(data[:end])
        stop = end + 4 + self._length
        if self._chunked or self._length == _UNTIL_CLOSE or len(data) != stop:
            self._head = b""  # the general path parses this head again
            return False
        status, head, close = self._status, self._head, self._close
        self._head = b""
        self.head_only = False
        if not 100 <= status < 200:
            self.done.append(Response(status, head, data[end + 4:], close))
        return True

    def eof(self) -> None:
        """The connection ended: completes a body that runs until close, else fails a partial one."""
        if self._head and not self._chunked and self._length == _UNTIL_CLOSE:
            self._finish(bytes(self.buf[self._body_start:]), len(self.buf))
        elif self._head or self.buf:
            raise ProtocolError("connection closed in the middle of a response")

    def _step(self) -> bool:
        if not self._head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    raise ProtocolError("response head larger than 64 KiB")
                return False
            self._parse_head(bytes(self.buf[:end]))
            self._body_start = end + 4
        if self._chunked:
            return self._step_chunked()
        if self._length == _UNTIL_CLOSE:
            return False
        stop = self._body_start + self._length
        if len(self.buf) < stop:
            return False
        self._finish(bytes(self.buf[self._body_start:stop]), stop)
        return True

    def _parse_head(self, head: bytes) -> None:
        if not head.startswith(b"HTTP/1.") or head[8:9] != b" ":
            raise ProtocolError(f"bad status line {head[:80]!r}")
        try:
            status = int(head[9:12])
        except ValueError:
            raise ProtocolError(f"bad status code {head[9:12]!r}") from None
        lower = head.lower()
        self._status = status
        self._head = head
        connection = _header_value(lower, b"connection:") if b"\nconnection:" in lower else None
        self._close = connection is not None and b"close" in connection
        self._chunked = False
        if self.head_only or status in (204, 304) or 100 <= status < 200:
            self._length = 0
            return
        if b"\ntransfer-encoding:" in lower:
            encoding = _header_value(lower, b"transfer-encoding:")
            if encoding is not None and b"chunked" in encoding:
                self._chunked = True
                return
        length = _header_value(lower, b"content-length:")
        if length is None:
            self._length = _UNTIL_CLOSE
            return
        try:
            self._length = int(length)
        except ValueError:
            raise ProtocolError("bad Content-Length") from None
        if self._length < 0:
            raise ProtocolError("bad Content-Length")

    def _step_chunked(self) -> bool:
        # Re-scans the chunk list from the body start on each call: responses here are small,
        # and this keeps the parser free of per-chunk state.
        body = bytearray()
        pos = self._body_start
        while True:
            line_end = self.buf.find(b"\r\n", pos)
            if line_end < 0:
                return False
            size_text = bytes(self.buf[pos:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                # Trailers (rare) end with an empty line, like the head.
                trailer_end = self.buf.find(b"\r\n", line_end + 2)
                while trailer_end >= 0 and trailer_end != line_end + 2:
                    line_end = trailer_end
                    trailer_end = self.buf.find(b"\r\n", line_end + 2)
                if trailer_end < 0:
                    return False
                self._finish(bytes(body), trailer_end + 2)
                return True
            data_end = line_end + 2 + size
            if len(self.buf) < data_end + 2:
                return False
            body += self.buf[line_end + 2:data_end]
            pos = data_end + 2

    def _finish(self, body: bytes, consumed: int) -> None:
        status, head, close = self._status, self._head, self._close
        del self.buf[:consumed]
        self._head = b""
        self.head_only = False
        if 100 <= status < 200:
            return  # an interim answer (100 Continue); the real one follows
        self.done.append(Response(status, head, body, close))


class _ClientProtocol(asyncio.Protocol):
    __slots__ = ("closed", "parser", "transport", "waiter")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = _ResponseParser()
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        try:
            parser.feed(data)
        except ProtocolError as e:
            self._fail(e)
            return
        waiter = self.waiter
        if parser.done and waiter is not None and not waiter.done():
            waiter.set_result(parser.done.pop(0))

    def eof_received(self) -> bool | None:
        try:
            self.parser.eof()
        except ProtocolError as e:
            self._fail(e)
        self._deliver()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed by the server"))

    def _deliver(self) -> None:
        if self.parser.done and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.parser.done.pop(0))

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class Connection:
    """One keep-alive connection; requests on it run one at a time (no pipelining).

    A request on a closed connection reconnects first, so callers just retry after an error.
    """

    def __init__(self, target: Target, headers: dict[str, str] | None = None,
                 connect_timeout_s: float = 10.0, source: str | None = None) -> None:
        self.target = target
        # The local address to connect from: one address has some 28,000 ports towards one
        # server port, so 100,000 agents on one machine come from several (127.0.0.x).
        self.source = source
        self.connect_timeout_s = connect_timeout_s
        self._fixed_head = f"Host: {target.host_header}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._proto: _ClientProtocol | None = None
        self._heads: dict[tuple[str, str], bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connects = 0  # how many times this connection had to (re)connect

    @property
    def is_open(self) -> bool:
        return self._proto is not None and not self._proto.closed

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        ctx: ssl.SSLContext | None = None
        if self.target.tls:
            # Benchmarks run against local servers with self-signed certificates.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _, proto = await asyncio.wait_for(
            loop.create_connection(_ClientProtocol, self.target.host, self.target.port, ssl=ctx,
                                   local_addr=(self.source, 0) if self.source else None),
            self.connect_timeout_s)
        self._proto = proto
        self._loop = loop
        self.connects += 1

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None,
                      timeout_s: float | None = None, reuse_head: bool = True) -> Response:
        """Sends one request and returns its response; raises OSError, ProtocolError or TimeoutError.

        The request head of (method, path) is formatted once and kept, as load loops repeat the
        same few requests; `reuse_head=False` for a path used once (a task id in it)."""
        if self._proto is None or self._proto.closed:
            await self.connect()
        proto = self._proto
        assert proto is not None and proto.transport is not None
        head = self._heads.get((method, path)) or self._head(method, path, reuse_head)
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        if body is not None:
            data = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        elif method in ("POST", "PUT", "PATCH"):
            data = head + b"Content-Length: 0\r\n\r\n"
        else:
            data = head + b"\r\n"
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[Response] = loop.create_future()
        parser = proto.parser
        if parser.done:
            parser.done.clear()  # without pipelining, an answer already here is unsolicited
        parser.head_only = method == "HEAD"
        proto.waiter = waiter
        proto.transport.write(data)
        timer = loop.call_later(timeout_s, _time_out, waiter) if timeout_s is not None else None
        try:
            response = await waiter
        except BaseException:
            # A timed-out, cancelled or broken request leaves the stream out of step: drop it.
            self.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            proto.waiter = None
        if response.close:
            self.close()
        return response

    def _head(self, method: str, path: str, keep: bool) -> bytes:
        head = f"{method} {self.target.base_path}{path} HTTP/1.1\r\n{self._fixed_head}".encode(
            "latin-1")
        if keep and len(self._heads) < 1000:
            self._heads[(method, path)] = head
        return head

    def close(self) -> None:
        if self._proto is not None:
            self._proto.closed = True
            if self._proto.transport is not None:
                self._proto.transport.close()
            self._proto = None


def _time_out(waiter: asyncio.Future[Response]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no response in time"))


def error_kind(exc: BaseException) -> str:
    return type(exc).__name__
