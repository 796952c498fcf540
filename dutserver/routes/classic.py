"""PROTOCOL part 1: the classic dutserver endpoints, spoken exactly, with its fixes.

Each handler parses, makes one call into the core, and shapes the answer in the classic wire
format. Compiled (dutserver/native.py): no closures on the hot path (poll, submit, result).
"""

from __future__ import annotations

import functools
from json.encoder import encode_basestring_ascii
from typing import Any

from dutserver.core import codec
from dutserver.core.auth import Auth
from dutserver.core.errors import ApiError
from dutserver.core.fleet import version_in_user_agent
from dutserver.core.model import Task
from dutserver.core.services import Services
from dutserver.core.tasks import TIMEOUT_MSG, Tasks
from dutserver.http.answer import Reply, ok, raw_json
from dutserver.http.endpoint import Endpoint, Respond, Route, after, direct, when_done
from dutserver.http.request import Request, parse_json

EMPTY = Reply(200)
EMPTY_TASK = raw_json(b"{}")


def wire_json(task: Task) -> bytes:
    """The task as the agent receives it, {…payload, "id": …, "type": …}, from the payload's
    JSON as stored (encoded once, at the submit)."""
    if not task.payload_json:
        return codec.compact({**task.payload, "id": task.id, "type": task.type}).encode()
    head = task.payload_json[:-1]
    comma = "," if len(head) > 1 else ""
    return f'{head}{comma}"id":{task.id},"type":{encode_basestring_ascii(task.type)}}}'.encode()


async def require_session(req: Request) -> str:
    """The admin behind a classic session header; 403 as the classic server answers."""
    user = await req.services.auth.session_of(req.header(b"authorization"))
    if user is None:
        raise ApiError(403, "Invalid or expired session")
    return user


def agent_version(req: Request) -> str | None:
    ua = req.header(b"user-agent")
    return version_in_user_agent(ua) if ua else None


async def login(req: Request) -> Reply:
    """Log in with user and pass (query, form or JSON body); returns a session token."""
    fields = await req.fields()
    token = await req.services.auth.login(fields.get("user"), fields.get("pass"), req.address)
    return ok({"msg": "Logged in", "token": token})


async def logout(req: Request) -> Reply:
    """End the session named by the Authorization header."""
    header = req.header(b"authorization")
    if not header:
        raise ApiError(400, "Missing Authorization header")
    await req.services.auth.logout(header, req.address)
    return ok({"msg": "Logged out"})


async def list_agents(req: Request) -> Reply:
    """Agent names and their online status."""
    await require_session(req)
    online = await req.services.fleet.online()
    return ok({"agents": list(online), "online": online})


async def register_agent(req: Request) -> Reply:
    """Register an agent (anyone while self-registration is on; an admin session always)."""
    services = req.services
    admin = await services.auth.session_of(req.header(b"authorization"))
    if admin is None and not await services.accounts.selfreg_enabled():
        raise ApiError(405, "Agents self-registration is disabled")
    fields = await req.fields()
    await services.auth.create_account(fields.get("user"), "agent", fields.get("pass"),
                                       admin or "self-registration", req.address)
    return EMPTY


async def get_selfreg(req: Request) -> Reply:
    """Whether agents may register themselves: text/plain 1 or 0."""
    await require_session(req)
    enabled = await req.services.accounts.selfreg_enabled()
    return Reply(200, b"1" if enabled else b"0", b"text/plain; charset=utf-8")


async def set_selfreg(req: Request) -> Reply:
    """Switch self-registration on (enabled=1) or off (enabled=0)."""
    user = await require_session(req)
    fields = await req.fields()
    value = str(fields.get("enabled", ""))
    if value not in ("0", "1"):
        raise ApiError(400, "Missing or invalid enabled parameter: use 1 or 0")
    await req.services.accounts.set_selfreg(value == "1", user, req.address)
    return EMPTY


@direct
def submit_task(req: Request, body: bytes, respond: Respond) -> None:
    """Submit a task to one or more agents and wait for the results."""
    auth: Auth = req.services.auth  # typed: compiled, a native call (dutserver/native.py)
    header = req.header(b"authorization")
    user = auth.session(header)
    if user is None:  # not in memory, or not checked for a while: the store says
        after(auth.session_of(header), respond,
              functools.partial(_submit_as, req, body, respond))
        return
    _submit(req, body, respond, user)


def _submit_as(req: Request, body: bytes, respond: Respond, user: str | None) -> None:
    if user is None:
        raise ApiError(403, "Invalid or expired session")
    _submit(req, body, respond, user)


def _submit(req: Request, body: bytes, respond: Respond, user: str) -> None:
    services: Services = req.services
    settings = services.settings
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
    tasks: Tasks = services.tasks
    # Partials, not closures that call each other (a reference cycle when compiled: native.py)
    submit = functools.partial(tasks.submit_and_wait, targets, task, user, timeout_s,
                               req.gone(), req.address,
                               functools.partial(_answer_submit, targets, respond))
    pending = tasks.prepare(targets)
    if pending is None:
        submit()
    else:  # an account added a moment ago, say: look before calling it unknown
        after(pending, respond, functools.partial(_call, submit))


def _call(fn: functools.partial[None], _: object) -> None:
    fn()


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
    auth: Auth = req.services.auth
    agent = auth.agent_known(req.header(b"authorization"), req.address)
    if agent is None:  # maybe added or changed a moment ago: 403 or known now
        after(auth.agent(req.header(b"authorization"), req.address), respond,
              functools.partial(_poll, req, respond))
        return
    _poll(req, respond, agent)


def _poll(req: Request, respond: Respond, agent: str) -> None:
    tasks: Tasks = req.services.tasks
    tasks.poll(agent, req.address, agent_version(req), req.gone(),
               functools.partial(_answer_poll, respond))


def _answer_poll(respond: Respond, task: Task | None) -> None:
    respond(EMPTY_TASK if task is None else raw_json(wire_json(task)))


@direct
def post_result(req: Request, body: bytes, respond: Respond) -> None:
    """The agent posts the result of task `id`."""
    auth: Auth = req.services.auth
    agent = auth.agent_known(req.header(b"authorization"), req.address)
    if agent is None:
        after(auth.agent(req.header(b"authorization"), req.address), respond,
              functools.partial(_result, req, body, respond))  # known now, or refused
        return
    _result(req, body, respond, agent)


def _result(req: Request, body: bytes, respond: Respond, agent: str) -> None:
    raw_id = req.query.get("id", "")
    if not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 18:
        raise ApiError(400, "Missing or invalid id parameter")
    result = parse_json(body)
    tasks: Tasks = req.services.tasks
    when_done(tasks.result(agent, req.address, agent_version(req), int(raw_id), result),
              respond, EMPTY)


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
