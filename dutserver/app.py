"""create_app(settings) -> Starlette. The lifespan opens the store and builds the services."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dutserver import native
from dutserver.auth import Auth
from dutserver.config import Settings
from dutserver.dispatcher import Dispatcher
from dutserver.routes import api, classic, ops
from dutserver.routes.common import Endpoint, SecurityHeaders
from dutserver.store import Store
from dutserver.tasks import Tasks

log = logging.getLogger("dutserver")

def create_app(settings: Settings) -> Starlette:
    routes = [*classic.routes(), *api.routes(), *ops.routes()]
    openapi = ops.build_openapi(routes)

    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[dict[str, Any]]:
        db = Store(settings.db_path, settings.sqlite_synchronous, settings.commit_interval_ms / 1000)
        await db.open()
        auth = Auth(settings, db)
        await auth.load()
        dispatcher = Dispatcher(settings.online_grace_s)
        tasks = Tasks(settings, db, dispatcher, auth)
        await tasks.recover()
        app.state.dispatcher = dispatcher  # server.py answers parked polls through it at SIGTERM
        background = [
            asyncio.create_task(_every(settings.accounts_refresh_s, _refresh(auth, tasks))),
            asyncio.create_task(_every(settings.sweep_interval_s, _sweep(auth, tasks))),
            asyncio.create_task(_every(settings.index_interval_s, _index(db))),
            # Once a second: every 0.1 s made the half-load p99 neither better nor worse
            # (bench/README.md, "Session 5").
            asyncio.create_task(_every(settings.checkpoint_interval_s, db.checkpoint)),
        ]
        # What start-up built lives as long as the process: out of the collector's full passes.
        gc.freeze()
        log.info("dutserver ready: %s (%d accounts; hot path %s)", settings.db_path,
                 len(auth.accounts), "compiled" if native.active() else
                 "interpreted: build it with `make native` (dutserver/native.py)")
        try:
            yield {"settings": settings, "store": db, "auth": auth, "dispatcher": dispatcher,
                   "tasks": tasks, "openapi": openapi,
                   # the direct path (direct.py): fixed paths straight to their Endpoints
                   "endpoints": {path.encode(): ep for path, ep in app.fixed_paths.items()}}
        finally:
            dispatcher.close()
            for job in background:
                job.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            tasks.sweep()  # last-seen times and due expiries go to disk before we stop
            auth.flush_sessions()
            await db.close()
            log.info("dutserver stopped")

    return App(
        routes=routes,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )


class App(Starlette):
    """Starlette, with a shortcut for fixed paths: a poll, a submit or a result goes straight to
    its Endpoint, skipping the router's regex scan and two exception middlewares (Endpoints
    render their own errors). Everything else takes Starlette's full path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixed_paths = {r.path: r.endpoint for r in self.routes
                            if isinstance(r, Route) and isinstance(r.endpoint, Endpoint)
                            and "{" not in r.path}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.fixed_paths.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _refresh(auth: Auth, tasks: Tasks) -> Callable[[], Awaitable[None]]:
    async def step() -> None:
        before = set(auth.accounts)
        await auth.refresh()
        if before - set(auth.accounts):
            tasks.cancel_for_removed_agents()
    return step


def _sweep(auth: Auth, tasks: Tasks) -> Callable[[], Awaitable[None]]:
    async def step() -> None:
        tasks.sweep()
        auth.flush_sessions()
        auth.throttle.prune()
    return step


def _index(db: Store) -> Callable[[], Awaitable[None]]:
    async def step() -> None:
        db.index_tasks_soon()
    return step


async def _every(interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await step()
        except Exception:  # a housekeeping hiccup must not end housekeeping
            log.exception("background job failed")


async def _http_error(request: StarletteRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    msg = "Not found" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse({"error": True, "msg": msg}, status_code=exc.status_code,
                        headers=exc.headers)


async def _server_error(request: StarletteRequest, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": True, "msg": "Internal server error"}, status_code=500)
