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
import functools
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dutserver.errors import ApiError
from dutserver.routes.common import Endpoint, Reply, Request, error_reply, render, too_large

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
log = logging.getLogger("dutserver.http")
_MALFORMED = Reply(400, ApiError(400, "Malformed HTTP request").body(), b"application/json")


class _NoEvent:
    """uvicorn's connection_lost sets the current cycle's message event; ours has none."""

    @staticmethod
    def set() -> None:
        return None


_NO_PARAMS: dict[str, Any] = {}  # fixed paths have no path parameters (nobody writes to it)


class DirectRequest(Request):
    """One request on the direct path, from its headers to its reply: what the handler sees
    of it (a Request) and where the protocol keeps its progress, in one object."""

    __slots__ = ("_by_name", "_on_gone", "chunks", "complete", "disconnected", "endpoint",
                 "error", "expect_continue", "keep_alive", "raw_path", "response_complete",
                 "size", "started")

    message_event: ClassVar[_NoEvent] = _NoEvent()  # compiled, a plain one is per instance

    def __init__(self, endpoint: Endpoint, method: str, raw_path: bytes,
                 headers: list[tuple[bytes, bytes]], by_name: dict[bytes, bytes], query: bytes,
                 keep_alive: bool, expect_continue: bool, state: dict[str, Any],
                 address: str) -> None:
        # Request's fields, set here rather than by its __init__: this runs for every request.
        self.method = method
        self.headers = headers
        self.query_string = query
        self.state = state
        self.address = address
        self.path_params = _NO_PARAMS
        self._query = None
        self._by_name = by_name  # header name -> its first value
        self.endpoint = endpoint
        self.raw_path = raw_path
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False         # the whole request is parsed
        self.started = False          # its turn has come (earlier pipelined requests answered)
        self.error: ApiError | None = None  # refused before its body was read
        self.response_complete = False
        self.disconnected = False
        self._on_gone: list[Callable[[Any], object]] | None = None

    def header(self, name: bytes) -> str | None:
        value = self._by_name.get(name)
        return None if value is None else value.decode("latin-1")

    async def body(self) -> bytes:
        return b"".join(self.chunks)  # complete and within the limit: checked as parsed

    # A request is its own Hangup (tasks.py): no Future per long request.
    def gone(self) -> DirectRequest:
        return self

    def done(self) -> bool:
        return self.disconnected

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None:
        if self.disconnected:
            asyncio.get_running_loop().call_soon(fn, self)
        elif self._on_gone is None:
            self._on_gone = [fn]
        else:
            self._on_gone.append(fn)

    @property
    def path(self) -> str:
        """For the log and the error replies only: the hot path never decodes it."""
        return self.raw_path.decode("ascii", "replace")

    def release(self) -> None:
        """Answered: what waited for a hang-up (through closures that lead back here) goes, so
        no reference cycle is left for the garbage collector, whose full passes stall the loop."""
        self._on_gone = None

    def lost(self) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        callbacks, self._on_gone = self._on_gone, None
        if callbacks:
            loop = asyncio.get_running_loop()
            for fn in callbacks:
                loop.call_soon(fn, self)


class Protocol(HttpToolsProtocol):
    """Set as uvicorn's http protocol class by server.py. The lifespan state carries the
    Endpoints by raw path ("endpoints") and the settings (for the body limit)."""

    cycle: Any
    _running: DirectRequest | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        client = self.client
        self.address = str(client[0]) if client else "unknown"
        self.endpoints: dict[bytes, Endpoint] = self.app_state.get("endpoints") or {}
        settings = self.app_state["settings"]
        self.body_max_bytes: int = settings.body_max_bytes
        # uvicorn's timeout_keep_alive is declared int, and the compiled code checks that
        self.keep_alive_s: float = settings.keep_alive_s
        self.dispatcher = self.app_state["dispatcher"]

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = None  # type: ignore[assignment]  # built only for the ASGI path

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))  # Expect: looked for once they are all in

    def on_headers_complete(self) -> None:
        headers = self.headers
        by_name = dict(reversed(headers))  # the first of repeated headers counts, as in header()
        expect = by_name.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            self.expect_100_continue = True
        url: Any = httptools.parse_url(self.url)  # its stub says bytes where None can come
        endpoint = self.endpoints.get(url.path)
        parser = self.parser
        if endpoint is None or parser.should_upgrade():
            self._asgi_headers_complete()
            return
        # HTTP/1.0 closes after the answer even with "Connection: keep-alive" (or the
        # Proxy-Connection llhttp reads alike), as uvicorn's path does; without those headers
        # should_keep_alive() says so already (and the version costs a string formatting per
        # request to ask for).
        keep_alive = parser.should_keep_alive() and (
            (b"connection" not in by_name and b"proxy-connection" not in by_name)
            or parser.get_http_version() != "1.0")
        cycle = DirectRequest(endpoint, parser.get_method().decode("ascii"), url.path, headers,
                              by_name, url.query or b"", keep_alive, self.expect_100_continue,
                              self.app_state, self.address)
        declared = by_name.get(b"content-length")  # its syntax is checked by the parser
        limit = self.body_max_bytes
        if declared is not None and (len(declared) > 18 or int(declared) > limit):
            cycle.error = too_large(limit)
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
        if not isinstance(cycle, DirectRequest):
            super().on_body(body)
            return
        if cycle.error is not None or cycle.response_complete:
            return
        cycle.size += len(body)
        limit = self.body_max_bytes
        if cycle.size > limit:
            cycle.chunks.clear()
            cycle.error = too_large(limit)
            if cycle.started:
                self._run(cycle)
            return
        cycle.chunks.append(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if not isinstance(cycle, DirectRequest):
            super().on_message_complete()
            return
        if cycle.error is not None:
            return  # already answered, or answered when its turn comes
        cycle.complete = True
        if cycle.started:
            self._run(cycle)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if isinstance(cycle, DirectRequest):
            self._begin(cycle)
        else:
            super()._start_asgi_task(cycle, app)

    def _begin(self, cycle: DirectRequest) -> None:
        cycle.started = True
        if cycle.error is not None or cycle.complete:
            self._run(cycle)
        elif cycle.expect_continue:
            self.transport.write(CONTINUE)

    def _run(self, cycle: DirectRequest) -> None:
        self._running = cycle
        if cycle.error is not None:
            cycle.keep_alive = False  # the rest of the body is not read
            self._respond(cycle, error_reply(cycle, cycle.path, cycle.error))
            return
        handler = cycle.endpoint.direct_handlers.get(cycle.method)
        if handler is None:
            task = self.loop.create_task(self._serve(cycle))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
            return

        # The hot path: the handler answers now or from a callback, never from a task. A
        # partial, not a closure: compiled, a closure's environment holds the closure itself, a
        # reference cycle per request for the collector (tests/test_no_garbage_cycles.py).
        respond = functools.partial(self._answer, cycle)
        try:
            handler(cycle, b"".join(cycle.chunks), respond)
        except Exception as exc:
            respond(exc)

    def _answer(self, cycle: DirectRequest, outcome: Reply | BaseException) -> None:
        if isinstance(outcome, BaseException):
            outcome = error_reply(cycle, cycle.path, outcome)
        self._respond(cycle, outcome)

    async def _serve(self, cycle: DirectRequest) -> None:
        self._respond(cycle, await cycle.endpoint.handle(cycle, cycle.path))

    def _respond(self, cycle: DirectRequest, reply: Reply) -> None:
        if cycle.response_complete:
            log.error("%s %s answered twice", cycle.method, cycle.path)
            return
        cycle.response_complete = True
        cycle.release()
        if self._running is cycle:
            self._running = None
        transport = self.transport
        if transport.is_closing():
            return
        # While shutting down, an answer is its connection's last.
        keep_alive = cycle.keep_alive and not self.dispatcher.closing
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', self.client and self.client[0],
                                    cycle.method, cycle.path, self.parser.get_http_version()
                                    if self.parser else "1.1", reply.status)
        transport.write(render(reply, cycle.method == "HEAD", keep_alive))
        if keep_alive:
            self.on_response_complete()
        else:
            transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request the parser refused: answered in the error shape like every other error
        (uvicorn's own answer is text/plain), then the connection closes."""
        log.info("malformed HTTP request from %s: %s", self.client and self.client[0], msg)
        self.transport.write(render(_MALFORMED, head=False, keep_alive=False))
        self.transport.close()

    # Keep-alive: uvicorn arms a timer after every response and cancels it with the next request,
    # two timer-handle operations per request. Here one timer per connection checks, when it
    # fires, whether the connection has really been idle that long, and re-arms if not.
    _idle_since: float | None = None

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None  # busy; the timer stays armed and looks again when it fires

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.keep_alive_s,
                                                                self._keep_alive_check)

    def _keep_alive_check(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None or self.transport.is_closing():
            return  # busy (a long-poll, say): the next response arms the timer again
        idle_s = self.loop.time() - self._idle_since
        if idle_s >= self.keep_alive_s:
            self.transport.close()
        else:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.keep_alive_s - idle_s, self._keep_alive_check)

    def connection_lost(self, exc: Exception | None) -> None:
        running = self._running
        if running is not None:
            running.lost()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)
