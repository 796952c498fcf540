"""Schedules (PROTOCOL part 2, "Schedules"). Parse, one call into the core (core/schedules.py),
shape."""

from __future__ import annotations

from dutserver.http.answer import Reply, ok
from dutserver.http.endpoint import Endpoint, Route
from dutserver.http.request import Request, int_param
from dutserver.routes.api import MAX_ID, path_id, require_admin


def schedule_id(req: Request) -> int:
    return path_id(req, "schedule")


async def create_schedule(req: Request) -> Reply:
    """Run a job on a schedule: {"name", "job": {a job's body}, and one of "cron" ("0 18 * *
    fri"), "at" (ISO 8601, once) or "every_s"; "tz" (IANA zone), "windows" (maintenance
    windows every run's job gets), "enabled"}."""
    user = await require_admin(req)
    view = await req.services.schedules.create(await req.json_object(), user, req.address)
    return ok({"schedule": view}, status=201)


async def list_schedules(req: Request) -> Reply:
    """Schedules, newest first, with their next and last runs; before_id pages."""
    await require_admin(req)
    limit = int_param(req, "limit", 100, minimum=1, maximum=500)
    before = int_param(req, "before_id", None, minimum=0, maximum=MAX_ID)
    found = await req.services.schedules.listing(before, limit or 100)
    return ok({"schedules": found})


async def get_schedule(req: Request) -> Reply:
    """One schedule: when it runs next, its last run, runs made and slots skipped."""
    await require_admin(req)
    return ok({"schedule": await req.services.schedules.view(schedule_id(req))})


async def delete_schedule(req: Request) -> Reply:
    """Delete a schedule: it never runs again; the jobs it made stay, and keep running."""
    user = await require_admin(req)
    the_id = schedule_id(req)
    await req.services.schedules.delete(the_id, user, req.address)
    return ok({"deleted": the_id})


async def enable_schedule(req: Request) -> Reply:
    """Switch a schedule on, from its next slot after now (409 if it is on already)."""
    user = await require_admin(req)
    view = await req.services.schedules.set_enabled(schedule_id(req), True, user, req.address)
    return ok({"schedule": view})


async def disable_schedule(req: Request) -> Reply:
    """Switch a schedule off (409 if it is off already); its running job goes on."""
    user = await require_admin(req)
    view = await req.services.schedules.set_enabled(schedule_id(req), False, user,
                                                    req.address)
    return ok({"schedule": view})


async def schedule_runs(req: Request) -> Reply:
    """The jobs a schedule made, newest first; before_id pages."""
    await require_admin(req)
    limit = int_param(req, "limit", 50, minimum=1, maximum=500)
    before = int_param(req, "before_id", None, minimum=0, maximum=MAX_ID)
    jobs = await req.services.schedules.runs(schedule_id(req), before, limit or 50)
    return ok({"jobs": jobs})


def routes() -> list[Route]:
    return [
        Route("/api/v1/schedules", Endpoint({"GET": list_schedules, "POST": create_schedule})),
        Route("/api/v1/schedules/{id:int}", Endpoint({"GET": get_schedule,
                                                      "DELETE": delete_schedule})),
        Route("/api/v1/schedules/{id:int}/enable", Endpoint({"POST": enable_schedule})),
        Route("/api/v1/schedules/{id:int}/disable", Endpoint({"POST": disable_schedule})),
        Route("/api/v1/schedules/{id:int}/runs", Endpoint({"GET": schedule_runs})),
    ]
