"""PROTOCOL part 2: the native API under /api/v1/."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from starlette.routing import Route

from dutserver import store
from dutserver.auth import Auth, check_secret, hash_secret
from dutserver.errors import ApiError, unknown_agent
from dutserver.routes.common import Endpoint, Reply, Request, float_param, int_param, ok
from dutserver.tasks import Tasks, iso

MAX_ID = 2**63 - 1  # SQLite's INTEGER; no task id can be larger
STATES = ("queued", "delivered", "done", "failed", "cancelled", "expired")


def require_admin(req: Request) -> str:
    header = req.header(b"authorization")
    user = req.state["auth"].session(header)
    if user is None:
        if header and (":" in header or header[:6].lower() == "basic "):
            raise ApiError(403, "Agent credentials cannot use the admin API")
        raise ApiError(401, "Not logged in, or the session expired")
    return user  # type: ignore[no-any-return]


def path_task_id(req: Request) -> int:
    task_id: int = req.path_params["task_id"]
    if task_id > MAX_ID:
        raise ApiError(404, f"Unknown task: {task_id}")
    return task_id


async def session_info(req: Request) -> Reply:
    """Who the session belongs to and when it expires."""
    user = require_admin(req)
    expires_ms = req.state["auth"].expires_ms(req.header(b"authorization"))
    return ok({"user": user, "type": "admin", "expires_at": iso(expires_ms)})


async def submit(req: Request) -> Reply:
    """Submit a task to agents without waiting; answered once the tasks are stored durably."""
    user = require_admin(req)
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
    tasks: Tasks = req.state["tasks"]
    created = await tasks.submit(targets, body.get("task"), user, expires_s, req.address)
    return ok({"tasks": [{"id": t.id, "target": t.agent} for t in created]}, status=202)


async def get_task(req: Request) -> Reply:
    """One task with its state and result; wait_s waits for a final state."""
    require_admin(req)
    tasks: Tasks = req.state["tasks"]
    task_id = path_task_id(req)
    wait_s = float_param(req, "wait_s", 0.0, 60.0) if req.query.get("wait_s") else 0.0
    view = await (tasks.wait_final(task_id, wait_s) if wait_s else tasks.view(task_id))
    return ok({"task": view})


async def list_tasks(req: Request) -> Reply:
    """Task history, newest first, with filters; before_id pages."""
    require_admin(req)
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
    tasks: Tasks = req.state["tasks"]
    views = await tasks.history(q.get("target") or None, state, q.get("submitted_by") or None,
                                before, ids, limit or 100)
    return ok({"tasks": views})


async def cancel_task(req: Request) -> Reply:
    """Cancel a task that was not yet delivered (409 once it left the queue)."""
    user = require_admin(req)
    tasks: Tasks = req.state["tasks"]
    view = await tasks.cancel(path_task_id(req), user, req.address)
    return ok({"task": view})


def _agent_view(req: Request, row: tuple[Any, ...]) -> dict[str, Any]:
    name, last_seen_ms, address, version, inventory = row
    slot = req.state["dispatcher"].slots.get(name)
    if slot is not None and slot.last_seen_ms is not None:  # memory is newer than the table
        last_seen_ms, address = slot.last_seen_ms, slot.address
        version = slot.version or version
    return {"name": name, "online": req.state["dispatcher"].is_online(name),
            "last_seen": iso(last_seen_ms), "address": address, "agent_version": version,
            "inventory": json.loads(inventory) if inventory else None}


async def list_agent_status(req: Request) -> Reply:
    """Every agent with online status, last seen, address, version and (unless inventory=0)
    its last inventory."""
    require_admin(req)
    with_inventory = req.query.get("inventory", "1") not in ("0", "false", "no")
    if with_inventory:
        await req.state["store"].barrier()  # an inventory that just came in is shown
    rows = await req.state["store"].read(store.agent_rows, with_inventory)
    views = []
    for row in rows:
        view = _agent_view(req, row)
        if not with_inventory:
            view.pop("inventory", None)
        views.append(view)
    return ok({"agents": views})


async def get_agent(req: Request) -> Reply:
    """One agent's status and inventory."""
    require_admin(req)
    name = req.path_params["name"]
    await req.state["store"].barrier()
    rows = await req.state["store"].read(store.agent_rows, True, name)
    if not rows:
        raise unknown_agent(name)
    return ok({"agent": _agent_view(req, rows[0])})


async def list_accounts(req: Request) -> Reply:
    """All accounts: name, type, creation and change times."""
    require_admin(req)
    rows = await req.state["store"].read(store.accounts_all)
    return ok({"accounts": [{"name": r[0], "type": r[1], "created_at": iso(r[3]),
                             "updated_at": iso(r[4])} for r in rows]})


async def add_account(req: Request) -> Reply:
    """Create an account: name, type (admin or agent), password."""
    user = require_admin(req)
    body = await req.json_object()
    kind = body.get("type")
    if kind not in ("admin", "agent"):
        raise ApiError(400, "Invalid account type: use admin or agent")
    await req.state["auth"].create_account(body.get("name"), kind, body.get("password"), user,
                                           req.address)
    return ok({"account": {"name": body["name"], "type": kind}}, status=201)


async def change_password(req: Request) -> Reply:
    """Set an account's password; its sessions end."""
    user = require_admin(req)
    name = req.path_params["name"]
    auth: Auth = req.state["auth"]
    acc = auth.accounts.get(name)
    if acc is None:
        raise ApiError(404, f"Unknown account: {name}")
    body = await req.json_object()
    secret = check_secret(acc.kind, body.get("password"))
    digest = await asyncio.to_thread(hash_secret, acc.kind, secret, auth.key)

    # partials, not closures (a reference cycle when compiled: native.py)
    if not await req.state["store"].write(functools.partial(_set_secret, name, digest)):
        raise ApiError(404, f"Unknown account: {name}")
    await auth.refresh()  # revokes its sessions: its secret changed
    req.state["store"].audit(user, "account_password", f"{acc.kind} {name}", req.address)
    return ok({"msg": "Password changed"})


def _set_secret(name: str, digest: str, conn: Any) -> bool:
    return store.account_set_secret(conn, name, digest, store.now_ms())


async def remove_account(req: Request) -> Reply:
    """Remove an account; its sessions end and its queued tasks are cancelled."""
    user = require_admin(req)
    name = req.path_params["name"]
    auth: Auth = req.state["auth"]
    if name == user:
        raise ApiError(409, "You cannot remove your own account")
    acc = auth.accounts.get(name)
    if acc is not None and acc.kind == "admin" and \
            sum(a.kind == "admin" for a in auth.accounts.values()) <= 1:
        raise ApiError(409, "Cannot remove the last admin account")

    if not await req.state["store"].write(functools.partial(store.account_remove, name=name)):
        raise ApiError(404, f"Unknown account: {name}")
    await auth.refresh()  # revokes its sessions: it is gone
    req.state["tasks"].cancel_for_removed_agents()
    req.state["store"].audit(user, "account_remove", name, req.address)
    return ok({"msg": "Account removed"})


async def audit_log(req: Request) -> Reply:
    """Audit events, newest first; before_id pages."""
    require_admin(req)
    limit = int_param(req, "limit", 100, minimum=1, maximum=1000)
    before = int_param(req, "before_id", None, minimum=0, maximum=MAX_ID)
    await req.state["store"].barrier()
    rows = await req.state["store"].read(store.audit_rows, before, limit or 100)
    return ok({"events": [{"id": r[0], "at": iso(r[1]), "actor": r[2], "action": r[3],
                           "detail": r[4], "address": r[5]} for r in rows]})


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
