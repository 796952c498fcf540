"""The direct path: a request to a fixed-path Endpoint, from its parsed headers to its answer,
without ASGI (dutserver/http/protocol.py hands each parser callback of such a request here).

The body is collected as it is parsed, the handler runs with a Request built from the parser's
fields (DirectRequest), and the reply goes out as one write. That skips what a request costs
between uvicorn and the app (scope dict, receive/send messages, header checks, two writes, a
disconnect watcher task per long-poll): a round trip is three requests, and that machinery cost
more than the round trip's own work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import httptools

from dutserver.core.errors import ApiError
from dutserver.core.services import Services
from dutserver.http.answer import Reply, refused, render
from dutserver.http.endpoint import Endpoint
from dutserver.http.request import Request, too_large

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
log = logging.getLogger("dutserver.http")


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
                 keep_alive: bool, expect_continue: bool, services: Services,
                 address: str) -> None:
        # Request's fields, set here rather than by its __init__: this runs for every request.
        self.method = method
        self.headers = headers
        self.query_string = query
        self.services = services
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


class Connection:
    """One connection's direct path: its state and its steps from headers to answer, in a class
    of our own. Compiled (dutserver/native.py), its attributes are C struct fields and its
    methods call each other in C; Protocol's own attributes live in an instance dict (its base,
    uvicorn's, is a Python class), and reading them was 7 % of a round trip's instructions.
    Protocol hands each parser callback on here; uvicorn's own path stays on Protocol."""

    def __init__(self, protocol: Any, transport: Any, address: str) -> None:
        self.protocol = protocol  # dutserver.protocol.Protocol; None once the connection is lost
        self.transport = transport
        self.parser: Any = protocol.parser
        self.flow: Any = protocol.flow
        self.pipeline: Any = protocol.pipeline
        self.loop: Any = protocol.loop
        self.server_state: Any = protocol.server_state
        self.tasks: Any = protocol.tasks
        self.access_log = bool(protocol.access_log)
        state: dict[str, Any] = protocol.app_state
        self.endpoints: dict[bytes, Endpoint] = state.get("endpoints") or {}
        services: Services = state["services"]
        self.services = services
        self.body_max_bytes: int = services.settings.body_max_bytes
        self.keep_alive_s: float = services.settings.keep_alive_s
        self.address = address
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect_continue = False
        self.running: DirectRequest | None = None  # handed to its handler, not yet answered
        # Keep-alive: uvicorn arms a timer after every response and cancels it with the next
        # request, two timer-handle operations per request. Here one timer per connection
        # checks, when it fires, whether the connection has really been idle that long.
        self.idle_since: float | None = None
        self.keep_alive_timer: Any = None

    def headers_complete(self) -> DirectRequest | None:
        """The request as a DirectRequest, or None for uvicorn's path."""
        headers = self.headers
        by_name = dict(reversed(headers))  # the first of repeated headers counts, as in header()
        expect = by_name.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            self.expect_continue = True
        url: Any = httptools.parse_url(self.url)  # its stub says bytes where None can come
        endpoint = self.endpoints.get(url.path)
        parser = self.parser
        if endpoint is None or parser.should_upgrade():
            return None
        # HTTP/1.0 closes after the answer even with "Connection: keep-alive" (or the
        # Proxy-Connection llhttp reads alike), as uvicorn's path does; without those headers
        # should_keep_alive() says so already (and the version costs a string formatting per
        # request to ask for).
        keep_alive = parser.should_keep_alive() and (
            (b"connection" not in by_name and b"proxy-connection" not in by_name)
            or parser.get_http_version() != "1.0")
        cycle = DirectRequest(endpoint, parser.get_method().decode("ascii"), url.path, headers,
                              by_name, url.query or b"", keep_alive, self.expect_continue,
                              self.services, self.address)
        declared = by_name.get(b"content-length")  # its syntax is checked by the parser
        limit = self.body_max_bytes
        if declared is not None and (len(declared) > 18 or int(declared) > limit):
            cycle.error = too_large(limit)
        return cycle

    def body(self, cycle: DirectRequest, body: bytes) -> None:
        if cycle.error is not None or cycle.response_complete:
            return
        cycle.size += len(body)
        limit = self.body_max_bytes
        if cycle.size > limit:
            cycle.chunks.clear()
            cycle.error = too_large(limit)
            if cycle.started:
                self.run(cycle)
            return
        cycle.chunks.append(body)

    def message_complete(self, cycle: DirectRequest) -> None:
        if cycle.error is not None:
            return  # already answered, or answered when its turn comes
        cycle.complete = True
        if cycle.started:
            self.run(cycle)

    def begin(self, cycle: DirectRequest) -> None:
        cycle.started = True
        if cycle.error is not None or cycle.complete:
            self.run(cycle)
        elif cycle.expect_continue:
            self.transport.write(CONTINUE)

    def run(self, cycle: DirectRequest) -> None:
        self.running = cycle
        if cycle.error is not None:
            cycle.keep_alive = False  # the rest of the body is not read
            self.answer(cycle, cycle.error)
            return
        # The same way in as ASGI's (Endpoint.dispatch). A direct handler answers now or from
        # a callback, never from a task. A partial, not a closure (a reference cycle per
        # request when compiled: native.py).
        task = cycle.endpoint.dispatch(cycle, b"".join(cycle.chunks),
                                       functools.partial(self.answer, cycle))
        if task is not None:  # a coroutine handler: uvicorn's shutdown waits for it too
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

    def answer(self, cycle: DirectRequest, outcome: Reply | BaseException) -> None:
        if isinstance(outcome, BaseException):
            outcome = refused(cycle.method, cycle.path, cycle.address, outcome)
        self.respond(cycle, outcome)

    def respond(self, cycle: DirectRequest, reply: Reply) -> None:
        if cycle.response_complete:
            log.error("%s %s answered twice", cycle.method, cycle.path)
            return
        cycle.response_complete = True
        cycle.release()
        if self.running is cycle:
            self.running = None
        transport = self.transport
        if transport.is_closing():
            return
        # While shutting down, an answer is its connection's last.
        keep_alive = cycle.keep_alive and not self.services.closing
        if self.access_log:
            self.protocol.access_logger.info(
                '%s - "%s %s HTTP/%s" %d', self.address, cycle.method, cycle.path,
                self.parser.get_http_version(), reply.status)
        transport.write(render(reply, cycle.method == "HEAD", keep_alive))
        if keep_alive:
            self.response_complete()
        else:
            transport.close()

    def response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self.protocol._start_asgi_task(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.keep_alive_timer is None:
            self.keep_alive_timer = self.loop.call_later(self.keep_alive_s,
                                                         self.keep_alive_check)

    def keep_alive_check(self) -> None:
        self.keep_alive_timer = None
        idle_since = self.idle_since
        if idle_since is None or self.transport.is_closing():
            return  # busy (a long-poll, say): the next response arms the timer again
        idle_s = self.loop.time() - idle_since
        if idle_s >= self.keep_alive_s:
            self.transport.close()
        else:
            self.keep_alive_timer = self.loop.call_later(self.keep_alive_s - idle_s,
                                                         self.keep_alive_check)

    def lost(self) -> None:
        running = self.running
        if running is not None:
            running.lost()
        if self.keep_alive_timer is not None:
            self.keep_alive_timer.cancel()
            self.keep_alive_timer = None
