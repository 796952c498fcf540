"""The ASGI application around the routes: Starlette's router, the security headers on every
answer, and Starlette's own errors rendered by our one renderer (http/answer.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dutserver.core.errors import ApiError
from dutserver.http.answer import SecurityHeaders, reply_headers, error_reply, refused
from dutserver.http.endpoint import Endpoint

log = logging.getLogger("dutserver.http")


def build_asgi(routes: Sequence[BaseRoute],
               lifespan: Callable[[Any], AbstractAsyncContextManager[Any]]) -> Starlette:
    return Starlette(
        routes=list(routes),
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )


def fixed_endpoints(routes: Sequence[BaseRoute]) -> dict[bytes, Endpoint]:
    """The Endpoints of paths without parameters, by raw path: the direct path (direct.py)
    finds them there without the router's regex scan."""
    return {r.path.encode(): r.endpoint for r in routes
            if isinstance(r, Route) and isinstance(r.endpoint, Endpoint) and "{" not in r.path}


def _response(exc: ApiError | Exception) -> Response:
    reply = error_reply(exc)
    headers = {k.decode(): v.decode() for k, v in reply_headers(reply) if k != b"content-length"}
    return Response(reply.body, status_code=reply.status, headers=headers)


async def _http_error(request: StarletteRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    msg = "Not found" if exc.status_code == 404 else str(exc.detail)
    return _response(ApiError(exc.status_code, msg, dict(exc.headers or {})))


async def _server_error(request: StarletteRequest, exc: Exception) -> Response:
    refused(request.method, request.url.path, request.client.host if request.client else "?",
            exc)
    return _response(exc)
