"""PROTOCOL part 1: the classic dutserver endpoints, spoken exactly, with its fixes."""

from __future__ import annotations

import functools
from typing import Any

from starlette.routing import Route

from dutserver import codec, store
from dutserver.auth import Auth
from dutserver.errors import ApiError
from dutserver.model import Task
from dutserver.routes.common import (Endpoint, Reply, Request, Respond, after, direct, ok,
                                      parse_json, raw_json, when_done)
from dutserver.config import Settings
from dutserver.dispatcher import Dispatcher
from dutserver.tasks import TIMEOUT_MSG, Tasks

EMPTY = Reply(200)
EMPTY_TASK = raw_json(b"{}")


def require_session(req: Request) -> str:
    """The admin behind a classic session header; 403 as the classic server answers."""
    auth: Auth = req.state["auth"]  # typed: compiled, a native call (dutserver/native.py)
    user = auth.session(req.header(b"authorization"))
    if user is None:
        raise ApiError(403, "Invalid or expired session")
    return user


async def require_agent(req: Request) -> str:
    return await req.state["auth"].agent(  # type: ignore[no-any-return]
        req.header(b"authorization"), req.address)


def agent_version(req: Request) -> str | None:
    """The reference agent says its version in its User-Agent: `dutagent/1.2.3`."""
    ua = req.header(b"user-agent")
    return _version_in(ua) if ua else None


@functools.lru_cache(maxsize=1024)  # every poll and result says it again: parse each once
def _version_in(ua: str) -> str | None:
    return ua[9:].split(" ", 1)[0][:32] if ua.startswith("dutagent/") else None


async def login(req: Request) -> Reply:
    """Log in with user and pass (query, form or JSON body); returns a session token."""
    fields = await req.fields()
    token = await req.state["auth"].login(fields.get("user"), fields.get("pass"), req.address)
    return ok({"msg": "Logged in", "token": token})


async def logout(req: Request) -> Reply:
    """End the session named by the Authorization header."""
    header = req.header(b"authorization")
    if not header:
        raise ApiError(400, "Missing Authorization header")
    user = req.state["auth"].session(header)
    if req.state["auth"].logout(header):
        req.state["store"].audit(user, "logout", "session closed", req.address)
    return ok({"msg": "Logged out"})


async def list_agents(req: Request) -> Reply:
    """Agent names and their online status."""
    require_session(req)
    auth: Auth = req.state["auth"]
    names = sorted(n for n, a in auth.accounts.items() if a.kind == "agent")
    online = req.state["dispatcher"].is_online
    return ok({"agents": names, "online": {n: online(n) for n in names}})


async def register_agent(req: Request) -> Reply:
    """Register an agent (anyone while self-registration is on; an admin session always)."""
    admin = req.state["auth"].session(req.header(b"authorization"))
    if admin is None and not await selfreg_enabled(req):
        raise ApiError(405, "Agents self-registration is disabled")
    fields = await req.fields()
    name, secret = fields.get("user"), fields.get("pass")
    await req.state["auth"].create_account(name, "agent", secret, admin or "self-registration",
                                           req.address)
    return EMPTY


async def selfreg_enabled(req: Request) -> bool:
    return bool(await req.state["store"].read(store.setting_get, "selfreg") == "1")


async def get_selfreg(req: Request) -> Reply:
    """Whether agents may register themselves: text/plain 1 or 0."""
    require_session(req)
    return Reply(200, b"1" if await selfreg_enabled(req) else b"0", b"text/plain; charset=utf-8")


async def set_selfreg(req: Request) -> Reply:
    """Switch self-registration on (enabled=1) or off (enabled=0)."""
    user = require_session(req)
    fields = await req.fields()
    value = str(fields.get("enabled", ""))
    if value not in ("0", "1"):
        raise ApiError(400, "Missing or invalid enabled parameter: use 1 or 0")
    await req.state["store"].write(store.setting_write("selfreg", value))
    req.state["store"].audit(user, "selfreg", "on" if value == "1" else "off", req.address)
    return EMPTY


@direct
def submit_task(req: Request, body: bytes, respond: Respond) -> None:
    """Submit a task to one or more agents and wait for the results."""
    user = require_session(req)
    settings: Settings = req.state["settings"]
    raw_targets = req.query.get("target")
    if not raw_targets:
        raise ApiError(400, "Missing target parameter")
    targets = raw_targets.split(",")
    timeout_s = settings.submit_timeout_s
    if req.query.get("timeout"):
        try:
            timeout_s = float(req.query["timeout"])
        except ValueError:
            raise ApiError(400, "Invalid timeout parameter: not a number") from None
        if not timeout_s > 0:
            raise ApiError(400, "Invalid timeout parameter: must be above 0")
        timeout_s = min(timeout_s, settings.submit_timeout_max_s)
    task = parse_json(body)
    auth: Auth = req.state["auth"]
    tasks: Tasks = req.state["tasks"]
    # Partials, not closures that call each other (a reference cycle when compiled: native.py)
    submit = functools.partial(tasks.submit_and_wait, targets, task, user, timeout_s,
                               req.gone(), req.address,
                               functools.partial(_answer_submit, targets, respond))
    if all(t in auth.accounts for t in targets):
        submit()
    else:  # maybe added by the CLI a moment ago: look before calling it unknown
        after(auth.knows(targets), respond, lambda _: submit())


def _answer_submit(targets: list[str], respond: Respond,
                   results: list[dict[str, Any] | None]) -> None:
    if len(targets) == 1:
        respond(ApiError(504, TIMEOUT_MSG) if results[0] is None
                else raw_json(codec.dumps(results[0]).encode()))
        return
    respond(ok({"results": [{**r, "target": t} if r is not None else
                            {"error": True, "msg": TIMEOUT_MSG, "target": t}
                            for t, r in zip(targets, results)]}))


@direct
def poll_task(req: Request, body: bytes, respond: Respond) -> None:
    """The agent's long-poll: the oldest queued task, or {} when the poll times out."""
    auth: Auth = req.state["auth"]
    agent = auth.agent_known(req.header(b"authorization"), req.address)
    if agent is None:  # maybe added or changed by the CLI a moment ago: 403 or known now
        after(auth.agent(req.header(b"authorization"), req.address), respond,
              lambda known: _poll(req, respond, known))
        return
    _poll(req, respond, agent)


def _poll(req: Request, respond: Respond, agent: str) -> None:
    dispatcher: Dispatcher = req.state["dispatcher"]
    tasks: Tasks = req.state["tasks"]
    slot = dispatcher.poll_started(agent, req.address, agent_version(req))
    gone = req.gone()

    def answer(task: Task | None) -> None:
        dispatcher.poll_ended(slot, dropped=gone.done() and task is None)
        respond(EMPTY_TASK if task is None else raw_json(task.wire_json()))

    tasks.next_for(agent, gone, answer)


@direct
def post_result(req: Request, body: bytes, respond: Respond) -> None:
    """The agent posts the result of task `id`."""
    auth: Auth = req.state["auth"]
    agent = auth.agent_known(req.header(b"authorization"), req.address)
    if agent is None:
        after(auth.agent(req.header(b"authorization"), req.address), respond,
              lambda _: post_result(req, body, respond))  # known now, or refused
        return
    raw_id = req.query.get("id", "")
    if not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 18:
        raise ApiError(400, "Missing or invalid id parameter")
    result = parse_json(body)
    dispatcher: Dispatcher = req.state["dispatcher"]
    tasks: Tasks = req.state["tasks"]
    dispatcher.seen(dispatcher.slot(agent), req.address, agent_version(req))
    when_done(tasks.record_result(agent, int(raw_id), result), respond, EMPTY)


def routes() -> list[Route]:
    tasks = Endpoint({"GET": poll_task, "POST": submit_task}, head=False)
    results = Endpoint({"POST": post_result})
    selfreg = Endpoint({"GET": get_selfreg, "POST": set_selfreg})
    return [
        Route("/tasks", tasks),
        Route("/tasks_result", results),
        Route("/task_result", results),
        Route("/login", Endpoint({"GET": login, "POST": login}, public={"GET", "POST"},
                                 head=False)),
        Route("/logout", Endpoint({m: logout for m in ("GET", "POST", "PUT", "DELETE")},
                                  head=False)),
        Route("/agents", Endpoint({"GET": list_agents, "POST": register_agent}, public={"POST"})),
        Route("/agent_selfreg", selfreg),
        Route("/agents_selfreg", selfreg),
    ]
