"""create_app(settings): the wiring. The lifespan opens the store, builds the core's Services
on it, runs the housekeeping, and hands the routes their one typed `services` object."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette

from dutserver import native
from dutserver.config import Settings
from dutserver.core.clock import Clock
from dutserver.core.services import build_services
from dutserver.http.asgi import build_asgi, fixed_endpoints
from dutserver.http.openapi import build_openapi
from dutserver.routes import api, classic, enroll, jobs, ops, rdfm, schedules
from dutserver.store import create_store

log = logging.getLogger("dutserver")


def create_app(settings: Settings) -> Starlette:
    # Other systems' agent protocols are served only when switched on: off, their paths are
    # nobody's (404, like any unknown path).
    devices = rdfm.routes() if settings.rdfm_devices else []
    routes = [*classic.routes(), *api.routes(), *enroll.routes(), *jobs.routes(),
              *schedules.routes(), *devices,
              *ops.routes()]
    openapi = build_openapi(routes)
    endpoints = fixed_endpoints(routes)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        store, notifier = create_store(settings)
        await store.open()
        services = build_services(settings, store, notifier, Clock())
        services.openapi = openapi
        await services.start()
        app.state.services = services  # server.py ends parked polls through it at SIGTERM
        jobs: list[tuple[float, Callable[[], Awaitable[None]]]] = [
            (settings.accounts_refresh_s, services.refresh),
            (settings.sweep_interval_s, _async(services.sweep)),
            (settings.sweep_interval_s, services.jobs.sweep),
            (settings.sweep_interval_s, services.schedules.run_due),  # a missed slot: the first sweep
            *store.periodic(),
        ]
        if notifier.fleet:  # several nodes on one database (core/sharing.py)
            jobs.append((settings.node_heartbeat_s, services.tasks.sharing.heartbeat))
        background = [asyncio.create_task(_every(interval, step)) for interval, step in jobs]
        # What start-up built lives as long as the process: out of the collector's full passes.
        gc.freeze()
        log.info("dutserver ready: %s (%d accounts; hot path %s)", settings.database,
                 len(services.auth.accounts), native.describe())
        try:
            yield {"services": services, "endpoints": endpoints}
        finally:
            services.close()
            for job in background:
                job.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            services.sweep()  # last-seen times and due expiries go to disk before we stop
            await store.close()
            log.info("dutserver stopped")

    return build_asgi(routes, lifespan)


def _async(step: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        step()
    return run


async def _every(interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await step()
        except Exception:  # a housekeeping hiccup must not end housekeeping
            log.exception("background job failed")
