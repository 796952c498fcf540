"""The HTTP protocol: uvicorn's httptools protocol, with a direct path for our Endpoints.

A request to a fixed-path Endpoint (polls, submits, results, every fixed API path) does not go
through ASGI: the body is collected as it is parsed, the handler runs with a Request built from
the parser's fields, and the reply goes out as one write. That skips what a request costs between
uvicorn and the app (scope dict, receive/send messages, header checks, two writes, a disconnect
watcher task per long-poll): a round trip is three requests, and that machinery cost more than
the round trip's own work. Everything else (the web files, paths with parameters, WebSocket
upgrades, malformed requests) takes uvicorn's own path unchanged, and so do connection handling,
keep-alive timeouts, pipelining, flow control and the graceful shutdown.

This leans on uvicorn's HttpToolsProtocol internals; pyproject.toml pins uvicorn to the minor
version this was written against, and the test suite runs every route through this path.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dutserver.routes.common import Endpoint, Reply, Request, render, too_large

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _NoEvent:
    """uvicorn's connection_lost sets the current cycle's message event; ours has none."""

    @staticmethod
    def set() -> None:
        return None


class DirectCycle:
    """One request on the direct path, from its headers to its reply."""

    __slots__ = ("_gone", "body", "complete", "disconnected", "endpoint", "error",
                 "expect_continue", "headers", "keep_alive", "method", "path", "query",
                 "response_complete", "size", "started")

    message_event = _NoEvent()

    def __init__(self, endpoint: Endpoint, method: str, path: str,
                 headers: list[tuple[bytes, bytes]], query: bytes, keep_alive: bool,
                 expect_continue: bool) -> None:
        self.endpoint = endpoint
        self.method = method
        self.path = path
        self.headers = headers
        self.query = query
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False         # the whole request is parsed
        self.started = False          # its turn has come (earlier pipelined requests answered)
        self.error: Reply | None = None
        self.response_complete = False
        self.disconnected = False
        self._gone: asyncio.Future[None] | None = None

    def gone(self) -> asyncio.Future[None]:
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
            if self.disconnected:
                self._gone.set_result(None)
        return self._gone

    def lost(self) -> None:
        self.disconnected = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)


class DirectRequest(Request):
    __slots__ = ("_cycle",)

    def __init__(self, cycle: DirectCycle, state: dict[str, Any], address: str) -> None:
        super().__init__(cycle.method, cycle.headers, cycle.query, state, address)
        self._cycle = cycle

    async def body(self) -> bytes:
        return b"".join(self._cycle.body)  # complete and within the limit: checked as parsed

    def gone(self) -> asyncio.Future[None]:
        return self._cycle.gone()


class Protocol(HttpToolsProtocol):
    """Set as uvicorn's http protocol class by server.py. The lifespan state carries the
    Endpoints by raw path ("endpoints") and the settings (for the body limit)."""

    cycle: Any
    _running: DirectCycle | None = None

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = None  # type: ignore[assignment]  # built only for the ASGI path

    def on_headers_complete(self) -> None:
        endpoints = self.app_state.get("endpoints")
        url = httptools.parse_url(self.url)
        endpoint = endpoints.get(url.path) if endpoints else None
        if endpoint is None or self.parser.should_upgrade():
            self._asgi_headers_complete()
            return
        parser = self.parser
        http_version = parser.get_http_version()
        method = parser.get_method().decode("ascii")
        cycle = DirectCycle(endpoint, method, url.path.decode("ascii"), self.headers,
                            url.query or b"", http_version != "1.0" and parser.should_keep_alive(),
                            self.expect_100_continue)
        limit = self.app_state["settings"].body_max_bytes
        for name, value in self.headers:  # the parser has checked its syntax already
            if name == b"content-length" and (len(value) > 18 or int(value) > limit):
                cycle.error = _error_reply(too_large(limit))
        previous = self.cycle
        self.cycle = cycle
        if previous is None or previous.response_complete:
            self._begin(cycle)
        else:  # pipelined: answered in order, after the one before it
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, None))  # type: ignore[arg-type]

    def _asgi_headers_complete(self) -> None:
        """uvicorn's own path: its scope (which its on_message_begin builds), then its cycle."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if not isinstance(cycle, DirectCycle):
            super().on_body(body)
            return
        if cycle.error is not None or cycle.response_complete:
            return
        cycle.size += len(body)
        limit = self.app_state["settings"].body_max_bytes
        if cycle.size > limit:
            cycle.body.clear()
            cycle.error = _error_reply(too_large(limit))
            if cycle.started:
                self._run(cycle)
            return
        cycle.body.append(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if not isinstance(cycle, DirectCycle):
            super().on_message_complete()
            return
        if cycle.error is not None:
            return  # already answered, or answered when its turn comes
        cycle.complete = True
        if cycle.started:
            self._run(cycle)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if isinstance(cycle, DirectCycle):
            self._begin(cycle)
        else:
            super()._start_asgi_task(cycle, app)

    def _begin(self, cycle: DirectCycle) -> None:
        cycle.started = True
        if cycle.error is not None or cycle.complete:
            self._run(cycle)
        elif cycle.expect_continue:
            self.transport.write(CONTINUE)

    def _run(self, cycle: DirectCycle) -> None:
        self._running = cycle
        task = self.loop.create_task(self._serve(cycle))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _serve(self, cycle: DirectCycle) -> None:
        if cycle.error is not None:
            reply = cycle.error
            cycle.keep_alive = False  # the rest of the body is not read
        else:
            client = self.client
            request = DirectRequest(cycle, self.app_state, str(client[0]) if client else "unknown")
            reply = await cycle.endpoint.handle(request, cycle.path)
        self._running = None
        cycle.response_complete = True
        if self.transport.is_closing():
            return
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', self.client and self.client[0],
                                    cycle.method, cycle.path, self.parser.get_http_version()
                                    if self.parser else "1.1", reply.status)
        self.transport.write(render(reply, cycle.method == "HEAD", cycle.keep_alive))
        if cycle.keep_alive:
            self.on_response_complete()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        running = self._running
        if running is not None:
            running.lost()
        super().connection_lost(exc)


def _error_reply(exc: Any) -> Reply:
    return Reply(exc.status, exc.body(), b"application/json")
