"""Endpoints: one path's handlers by method, and the one way into them.

A request comes either through ASGI (Starlette's router, or any ASGI server) or on the direct
path of dutserver/http/direct.py, below ASGI. Both end in `Endpoint.dispatch(request, body,
respond)`. Direct handlers (@direct: polls, submits, results) run in the turn their request
arrived in and answer through `respond` (now, or from a callback), so the hot path needs no task
per request; the others are coroutines, run as a task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar, cast

from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from dutserver.core.errors import ApiError
from dutserver.http.answer import Reply, refused, send_reply
from dutserver.http.request import AsgiRequest, Request

# Starlette's route types, for the route modules (which know no ASGI framework themselves).
__all__ = ["BaseRoute", "Endpoint", "Mount", "Route", "after", "direct", "when_done"]
T = TypeVar("T")


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
        self.direct_handlers: dict[str, DirectHandler] = {
            m: cast(DirectHandler, h) for m, h in self.handlers.items() if is_direct(h)}

    def dispatch(self, req: Request, body: bytes,
                 respond: Respond) -> asyncio.Task[None] | None:
        """The one way in: the handler for req's method, with the whole body; its answer (a
        Reply, or the exception that refuses the request) goes to respond. Returns the task a
        coroutine handler runs in (the direct path hands it to uvicorn's shutdown wait)."""
        direct_handler = self.direct_handlers.get(req.method)
        if direct_handler is not None:
            try:
                direct_handler(req, body, respond)
            except Exception as exc:
                respond(exc)
            return None
        handler = self.handlers.get(req.method)
        if handler is None:
            respond(ApiError(405, f"Method {req.method} not allowed; use {self._allow}",
                             {"Allow": self._allow}))
            return None
        return asyncio.get_running_loop().create_task(
            _run(cast(Handler, handler), req, respond))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI: the body read first, then dispatch, as on the direct path."""
        req = AsgiRequest(scope, receive)
        answer: asyncio.Future[Reply | BaseException] = asyncio.get_running_loop().create_future()
        try:
            self.dispatch(req, await req.body(), answer.set_result)
            outcome = await answer
        except Exception as exc:  # the body could not be read
            outcome = exc
        finally:
            req.finish()
        if isinstance(outcome, BaseException):
            outcome = refused(req.method, scope["path"], req.address, outcome)
        await send_reply(send, outcome, head=scope["method"] == "HEAD")


async def _run(handler: Handler, req: Request, respond: Respond) -> None:
    try:
        reply = await handler(req)
    except Exception as exc:
        respond(exc)
        return
    respond(reply)
