"""The HTTP protocol: uvicorn's httptools protocol, with a direct path for our Endpoints.

A request to a fixed-path Endpoint (polls, submits, results, every fixed API path) does not go
through ASGI: each parser callback goes to the connection's Connection (dutserver/http/direct.py),
which answers it without the app. Everything else (the web files, paths with parameters,
WebSocket upgrades) takes uvicorn's own path unchanged, and so do connection handling,
pipelining, flow control and the graceful shutdown; malformed requests get our error shape, and
the keep-alive timer is the Connection's (one per connection, not two operations per request).

This leans on uvicorn's HttpToolsProtocol internals; pyproject.toml pins uvicorn to the minor
version this was written against, and the test suite runs every route through this path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dutserver.core.errors import ApiError
from dutserver.http.answer import error_reply, render
from dutserver.http.direct import Connection, DirectRequest

log = logging.getLogger("dutserver.http")
_MALFORMED = error_reply(ApiError(400, "Malformed HTTP request"))


class Protocol(HttpToolsProtocol):
    """Set as uvicorn's http protocol class by server.py. The lifespan state carries the
    Endpoints by raw path ("endpoints") and the Services ("services"). A request for
    one of them goes to the connection's Connection; the rest takes uvicorn's path."""

    cycle: Any
    conn: Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        client = self.client
        self.conn = Connection(self, transport, str(client[0]) if client else "unknown")

    # uvicorn's data_received and on_url, here so that they are compiled with the rest: they
    # run for every request (the upgrade and error branches are uvicorn's, unchanged).
    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.idle_since = None  # busy; the keep-alive timer looks again when it fires
        try:
            conn.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)

    def on_url(self, url: bytes) -> None:
        conn = self.conn
        conn.url += url

    def on_message_begin(self) -> None:
        conn = self.conn
        conn.url = b""
        conn.expect_continue = False
        conn.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.conn.headers.append((name.lower(), value))  # Expect: looked for once all are in

    def on_headers_complete(self) -> None:
        conn = self.conn
        cycle = conn.headers_complete()
        if cycle is None:
            self._asgi_headers_complete(conn)
            return
        previous = self.cycle
        self.cycle = cycle
        if previous is None or previous.response_complete:
            conn.begin(cycle)
        else:  # pipelined: answered in order, after the one before it
            conn.flow.pause_reading()
            conn.pipeline.appendleft((cycle, None))

    def _asgi_headers_complete(self, conn: Connection) -> None:
        """uvicorn's own path: its scope (which its on_message_begin builds), then its cycle."""
        super().on_message_begin()
        self.url, self.headers = conn.url, conn.headers
        self.expect_100_continue = conn.expect_continue
        self.scope["headers"] = conn.headers
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if isinstance(cycle, DirectRequest):
            self.conn.body(cycle, body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if isinstance(cycle, DirectRequest):
            self.conn.message_complete(cycle)
        else:
            super().on_message_complete()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if isinstance(cycle, DirectRequest):
            self.conn.begin(cycle)
        else:
            super()._start_asgi_task(cycle, app)

    def send_400_response(self, msg: str) -> None:
        """A request the parser refused: answered in the error shape like every other error
        (uvicorn's own answer is text/plain), then the connection closes."""
        log.info("malformed HTTP request from %s: %s", self.client and self.client[0], msg)
        self.transport.write(render(_MALFORMED, head=False, keep_alive=False))
        self.transport.close()

    def _unset_keepalive_if_required(self) -> None:
        self.conn.idle_since = None

    def on_response_complete(self) -> None:  # uvicorn's path ends its requests here too
        self.conn.response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        conn.lost()
        super().connection_lost(exc)
        # No cycle left behind: the parser holds Protocol's bound methods (uvicorn drops its
        # own reference to it here), the Connection the Protocol. What runs after this (an
        # answer to a hung-up poll, the keep-alive timer) stops at transport.is_closing().
        conn.protocol = conn.parser = None
