"""Fleet jobs, selectors and atomic batches (PROTOCOL part 2, "Jobs"). Parse, one call into
the core (core/jobs.py, core/batches.py), shape."""

from __future__ import annotations

from dutserver.core import batches
from dutserver.http.answer import Reply, ok
from dutserver.http.endpoint import Endpoint, Route
from dutserver.http.request import Request, int_param
from dutserver.routes.api import MAX_ID, path_id, require_admin


def job_id(req: Request) -> int:
    return path_id(req, "job")


async def create_job(req: Request) -> Reply:
    """Run a task on a list of agents or a selector, as a job: {"task", "targets" or
    "selector", "offline" (queue|skip), "expires_s", "canary", "wave" (N or "P%"), "pause_s"
    (seconds or "manual"), "max_failures" (N or "P%"), "nonzero_fails", "windows" (maintenance windows: waves go
    out only inside one), "tz"}."""
    user = await require_admin(req)
    view = await req.services.jobs.create(await req.json_object(), user, req.address)
    return ok({"job": view}, status=201)


async def list_jobs(req: Request) -> Reply:
    """Jobs, newest first, with counts by task state; state= and schedule_id= filter,
    before_id pages."""
    await require_admin(req)
    limit = int_param(req, "limit", 50, minimum=1, maximum=500)
    before = int_param(req, "before_id", None, minimum=0, maximum=MAX_ID)
    schedule = int_param(req, "schedule_id", None, minimum=0, maximum=MAX_ID)
    jobs = await req.services.jobs.listing(req.query.get("state") or None, before, limit or 50,
                                           schedule)
    return ok({"jobs": jobs})


async def get_job(req: Request) -> Reply:
    """One job: its state, counts by task state per wave, failures and budget."""
    await require_admin(req)
    view = await req.services.jobs.view(job_id(req))
    return ok({"job": view})


async def job_targets(req: Request) -> Reply:
    """A job's targets with their task's state and result, by name; after= pages."""
    await require_admin(req)
    the_id = job_id(req)
    await req.services.jobs.view(the_id)  # 404 for an unknown job
    limit = int_param(req, "limit", 200, minimum=1, maximum=1000)
    targets = await req.services.jobs.targets(the_id, req.query.get("after") or None,
                                              limit or 200)
    return ok({"targets": targets})


async def job_buckets(req: Request) -> Reply:
    """A job's results grouped by what they said, largest first (normalize=0 keeps
    whitespace; digits=1 merges results that differ only in numbers)."""
    await require_admin(req)
    the_id = job_id(req)
    await req.services.jobs.view(the_id)
    q = req.query
    groups = await req.services.jobs.buckets(the_id, q.get("normalize", "1") != "0",
                                             q.get("digits", "0") == "1")
    return ok({"buckets": groups})


async def _act(req: Request, action: str) -> Reply:
    user = await require_admin(req)
    view = await req.services.jobs.act(job_id(req), action, user, req.address)
    return ok({"job": view})


async def pause_job(req: Request) -> Reply:
    """Pause a running job: nothing more is sent until it is resumed."""
    return await _act(req, "pause")


async def resume_job(req: Request) -> Reply:
    """Resume a paused job (409 if it is not paused)."""
    return await _act(req, "resume")


async def continue_job(req: Request) -> Reply:
    """Resume a job that its failure budget paused, with no budget from now on."""
    return await _act(req, "continue")


async def abort_job(req: Request) -> Reply:
    """Abort a job: its queued tasks are cancelled, running ones finish."""
    return await _act(req, "abort")


async def rerun_job(req: Request) -> Reply:
    """A new job with the same task, to one bucket's agents ({"bucket": N}) or to the
    failed ones ({"failed": true})."""
    user = await require_admin(req)
    view = await req.services.jobs.rerun(job_id(req), await req.json_object(), user,
                                         req.address)
    return ok({"job": view}, status=201)


async def preview_selector(req: Request) -> Reply:
    """Which agents a selector matches now (selector=…; type= leaves out those that do
    not run that task type)."""
    await require_admin(req)
    agents = await req.services.jobs.preview(req.query.get("selector"),
                                             req.query.get("type") or None)
    return ok({"agents": agents, "count": len(agents)})


async def submit_batch(req: Request) -> Reply:
    """Several submits stored all or nothing: {"submits": [{"targets", "task",
    "expires_s"}, …]}; a refused part names itself and nothing is stored."""
    user = await require_admin(req)
    body = await req.json_object()
    created = await batches.submit(req.services.tasks, body.get("submits"), user, req.address)
    return ok({"submits": [{"tasks": [{"id": t.id, "target": t.agent} for t in part]}
                           for part in created]}, status=202)


def routes() -> list[Route]:
    return [
        Route("/api/v1/jobs", Endpoint({"GET": list_jobs, "POST": create_job})),
        Route("/api/v1/jobs/{id:int}", Endpoint({"GET": get_job})),
        Route("/api/v1/jobs/{id:int}/targets", Endpoint({"GET": job_targets})),
        Route("/api/v1/jobs/{id:int}/buckets", Endpoint({"GET": job_buckets})),
        Route("/api/v1/jobs/{id:int}/pause", Endpoint({"POST": pause_job})),
        Route("/api/v1/jobs/{id:int}/resume", Endpoint({"POST": resume_job})),
        Route("/api/v1/jobs/{id:int}/continue", Endpoint({"POST": continue_job})),
        Route("/api/v1/jobs/{id:int}/abort", Endpoint({"POST": abort_job})),
        Route("/api/v1/jobs/{id:int}/rerun", Endpoint({"POST": rerun_job})),
        Route("/api/v1/selector", Endpoint({"GET": preview_selector})),
        Route("/api/v1/batches", Endpoint({"POST": submit_batch})),
    ]
