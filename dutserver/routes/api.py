"""PROTOCOL part 2: the native API under /api/v1/. Parse, one call into the core, shape.

Compiled (dutserver/native.py): never `await` inside a dict or list display (`ok({"x": await
…})`): mypyc 1.20 keeps the half-built display across the suspension with a reference too few,
and the server crashed a little later. Await into a local first."""

from __future__ import annotations

from dutserver.core.errors import ApiError
from dutserver.core.model import TaskFilter
from dutserver.core.views import iso
from dutserver.http.answer import Reply, ok
from dutserver.http.endpoint import Endpoint, Route
from dutserver.http.request import Request, float_param, int_param

MAX_ID = 2**63 - 1  # a 64-bit signed integer, as both stores keep it; no task id is larger
STATES = ("queued", "delivered", "done", "failed", "cancelled", "expired")


async def require_admin(req: Request) -> str:
    header = req.header(b"authorization")
    user = await req.services.auth.session_of(header)
    if user is None:
        if header and (":" in header or header[:6].lower() == "basic "):
            raise ApiError(403, "Agent credentials cannot use the admin API")
        raise ApiError(401, "Not logged in, or the session expired")
    return user


def path_id(req: Request, what: str, key: str = "id") -> int:
    """An integer id from the path; 404 past what the stores hold (no such id exists)."""
    value: int = req.path_params[key]
    if value > MAX_ID:
        raise ApiError(404, f"Unknown {what}: {value}")
    return value


def path_task_id(req: Request) -> int:
    return path_id(req, "task", "task_id")


async def session_info(req: Request) -> Reply:
    """Who the session belongs to and when it expires."""
    user = await require_admin(req)
    expires_ms = req.services.auth.expires_ms(req.header(b"authorization"))
    return ok({"user": user, "type": "admin", "expires_at": iso(expires_ms)})


async def submit(req: Request) -> Reply:
    """Submit a task to agents without waiting; answered once the tasks are stored durably."""
    user = await require_admin(req)
    body = await req.json_object()
    targets = body.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ApiError(400, "targets must be a non-empty list of agent names")
    if len(targets) > 10000:
        raise ApiError(400, "Too many targets (at most 10000)")
    expires_s = body.get("expires_s")
    if expires_s is not None and (isinstance(expires_s, bool) or
                                  not isinstance(expires_s, (int, float)) or
                                  not 0 < expires_s <= 366 * 86400):
        raise ApiError(400, "expires_s must be a number of seconds between 0 and one year")
    created = await req.services.tasks.submit(targets, body.get("task"), user, expires_s,
                                              req.address)
    return ok({"tasks": [{"id": t.id, "target": t.agent} for t in created]}, status=202)


async def get_task(req: Request) -> Reply:
    """One task with its state and result; wait_s waits for a final state."""
    await require_admin(req)
    tasks = req.services.tasks
    task_id = path_task_id(req)
    wait_s = float_param(req, "wait_s", 0.0, 60.0) if req.query.get("wait_s") else 0.0
    view = await (tasks.wait_final(task_id, wait_s) if wait_s else tasks.view(task_id))
    return ok({"task": view})


async def list_tasks(req: Request) -> Reply:
    """Task history, newest first, with filters; before_id pages."""
    await require_admin(req)
    q = req.query
    state = q.get("state") or None
    if state is not None and state not in STATES:
        raise ApiError(400, f"Invalid state parameter: use one of {', '.join(STATES)}")
    ids = None
    if q.get("ids"):
        try:
            ids = [int(x) for x in q["ids"].split(",")]
        except ValueError:
            ids = [-1]
        if not all(0 <= i <= MAX_ID for i in ids):
            raise ApiError(400, "Invalid ids parameter: use a comma list of task ids")
        if len(ids) > 1000:
            raise ApiError(400, "Invalid ids parameter: at most 1000 ids")
    limit = int_param(req, "limit", 100, minimum=1, maximum=1000)
    before = int_param(req, "before_id", None, minimum=0, maximum=MAX_ID)
    views = await req.services.tasks.history(TaskFilter(
        agent=q.get("target") or None, state=state, submitted_by=q.get("submitted_by") or None,
        before_id=before, ids=tuple(ids) if ids is not None else None, limit=limit or 100))
    return ok({"tasks": views})


async def cancel_task(req: Request) -> Reply:
    """Cancel a task that was not yet delivered (409 once it left the queue)."""
    user = await require_admin(req)
    view = await req.services.tasks.cancel(path_task_id(req), user, req.address)
    return ok({"task": view})


async def list_agent_status(req: Request) -> Reply:
    """Every agent with online status, last seen, address, version and (unless inventory=0)
    its last inventory."""
    await require_admin(req)
    with_inventory = req.query.get("inventory", "1") not in ("0", "false", "no")
    agents = await req.services.fleet.statuses(with_inventory)
    return ok({"agents": agents})


async def get_agent(req: Request) -> Reply:
    """One agent's status and inventory."""
    await require_admin(req)
    agent = await req.services.fleet.status(req.path_params["name"])
    return ok({"agent": agent})


async def list_accounts(req: Request) -> Reply:
    """All accounts: name, type, creation and change times."""
    await require_admin(req)
    accounts = await req.services.accounts.listing()
    return ok({"accounts": accounts})


async def add_account(req: Request) -> Reply:
    """Create an account: name, type (admin or agent), password."""
    user = await require_admin(req)
    body = await req.json_object()
    kind = body.get("type")
    if kind not in ("admin", "agent"):
        raise ApiError(400, "Invalid account type: use admin or agent")
    await req.services.auth.create_account(body.get("name"), kind, body.get("password"), user,
                                           req.address)
    return ok({"account": {"name": body["name"], "type": kind}}, status=201)


async def change_password(req: Request) -> Reply:
    """Set an account's password; its sessions end."""
    user = await require_admin(req)
    name = req.path_params["name"]
    if name not in req.services.auth.accounts:
        raise ApiError(404, f"Unknown account: {name}")
    body = await req.json_object()
    await req.services.accounts.set_password(name, body.get("password"), user, req.address)
    return ok({"msg": "Password changed"})


async def remove_account(req: Request) -> Reply:
    """Remove an account; its sessions end and its queued tasks are cancelled."""
    user = await require_admin(req)
    await req.services.accounts.remove(req.path_params["name"], user, req.address)
    return ok({"msg": "Account removed"})


async def audit_log(req: Request) -> Reply:
    """Audit events, newest first; before_id pages."""
    await require_admin(req)
    limit = int_param(req, "limit", 100, minimum=1, maximum=1000)
    before = int_param(req, "before_id", None, minimum=0, maximum=MAX_ID)
    events = await req.services.accounts.audit_events(before, limit or 100)
    return ok({"events": events})


def routes() -> list[Route]:
    return [
        Route("/api/v1/session", Endpoint({"GET": session_info})),
        Route("/api/v1/tasks", Endpoint({"GET": list_tasks, "POST": submit})),
        Route("/api/v1/tasks/{task_id:int}", Endpoint({"GET": get_task})),
        Route("/api/v1/tasks/{task_id:int}/cancel", Endpoint({"POST": cancel_task})),
        Route("/api/v1/agents", Endpoint({"GET": list_agent_status})),
        Route("/api/v1/agents/{name}", Endpoint({"GET": get_agent})),
        Route("/api/v1/accounts", Endpoint({"GET": list_accounts, "POST": add_account})),
        Route("/api/v1/accounts/{name}/password", Endpoint({"POST": change_password})),
        Route("/api/v1/accounts/{name}", Endpoint({"DELETE": remove_account})),
        Route("/api/v1/audit", Endpoint({"GET": audit_log})),
    ]
