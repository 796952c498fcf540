"""Enrollment (PROTOCOL part 2, "Enrollment"): machines ask to join, admins decide, tokens,
and what an agent says of itself (capabilities, a new credential). Parse, one call into the
core (core/enrollment.py), shape."""

from __future__ import annotations

from dutserver.http.answer import Reply, ok
from dutserver.http.endpoint import Endpoint, Route
from dutserver.http.request import Request
from dutserver.routes.api import path_id, require_admin


async def require_agent(req: Request) -> str:
    return await req.services.auth.agent(req.header(b"authorization"), req.address)


# --- the machine's side ----------------------------------------------------------------------

async def enroll(req: Request) -> Reply:
    """Ask to join: an enrollment token, the agent's own credential, its facts and
    capabilities. Pending until an admin accepts (or accepted at once by an auto_accept
    token). No authentication: the token is the permission."""
    body = await req.json_object()
    answer = await req.services.enrollment.request(body, req.address)
    return ok({"enrollment": answer}, status=202)


async def enroll_status(req: Request) -> Reply:
    """What became of a request (pending, accepted with the agent's name, rejected, revoked,
    expired), for the machine that made it: Authorization: Bearer CREDENTIAL."""
    answer = await req.services.enrollment.status(path_id(req, "enrollment"),
                                                  req.header(b"authorization"), req.address)
    return ok({"enrollment": answer})


async def hello(req: Request) -> Reply:
    """An agent says which task types it runs (and its facts) when it starts polling; the
    server refuses to queue any other type for it."""
    agent = await require_agent(req)
    await req.services.enrollment.hello(agent, await req.json_object())
    return ok({})


async def new_credential(req: Request) -> Reply:
    """A re-keyed agent's new credential (sent with the old one, which keeps working until
    the new one is first used)."""
    agent = await require_agent(req)
    await req.services.enrollment.new_credential(agent, await req.json_object(), req.address)
    return ok({"msg": "New credential recorded; it replaces the old one when first used"})


# --- admins ----------------------------------------------------------------------------------

async def list_enrollments(req: Request) -> Reply:
    """Requests to join, newest first, filtered by state (pending, accepted, rejected,
    revoked, expired) and kind (agent, rdfm, oco); with the number pending."""
    await require_admin(req)
    answer = await req.services.enrollment.listing(req.query.get("state") or None,
                                                   req.query.get("kind") or None)
    return ok(answer)


async def accept(req: Request) -> Reply:
    """Accept a pending request; optional JSON body {"name": …, "labels": {…}}."""
    user = await require_admin(req)
    body = await req.json_object() if (await req.body()).strip() else {}
    view = await req.services.enrollment.accept(path_id(req, "enrollment"), body, user,
                                                req.address)
    return ok({"enrollment": view})


async def reject(req: Request) -> Reply:
    """Reject a pending request."""
    user = await require_admin(req)
    view = await req.services.enrollment.reject(path_id(req, "enrollment"), user, req.address)
    return ok({"enrollment": view})


async def list_tokens(req: Request) -> Reply:
    """Enrollment tokens (never the tokens themselves): expiry, uses, labels, state."""
    await require_admin(req)
    tokens = await req.services.enrollment.tokens()
    return ok({"tokens": tokens})


async def create_token(req: Request) -> Reply:
    """Create an enrollment token: {"expires_s", "max_uses" (null: unlimited), "labels",
    "auto_accept", "note"}. The token is in this answer only."""
    user = await require_admin(req)
    view = await req.services.enrollment.create_token(await req.json_object(), user,
                                                      req.address)
    return ok({"token": view}, status=201)


async def revoke_token(req: Request) -> Reply:
    """Revoke an enrollment token: it stops working at once."""
    user = await require_admin(req)
    await req.services.enrollment.revoke_token(path_id(req, "token"), user, req.address)
    return ok({"msg": "Token revoked"})


async def revoke_agent(req: Request) -> Reply:
    """Revoke an agent's identity: its next request gets 403, a parked poll is answered."""
    user = await require_admin(req)
    await req.services.enrollment.revoke(req.path_params["name"], user, req.address)
    return ok({"msg": "Agent revoked"})


async def rekey_agent(req: Request) -> Reply:
    """Tell an agent to make a new credential (a rekey task, with its next poll)."""
    user = await require_admin(req)
    answer = await req.services.enrollment.rekey(req.path_params["name"], user, req.address)
    return ok(answer, status=202)


async def adopt_agent(req: Request) -> Reply:
    """Make an existing agent account an enrolled identity (revocable, re-keyable)."""
    user = await require_admin(req)
    view = await req.services.enrollment.adopt(req.path_params["name"], user, req.address)
    return ok({"enrollment": view})


async def set_labels(req: Request) -> Reply:
    """Replace an agent's labels: a JSON object of name: value."""
    user = await require_admin(req)
    body = await req.json_object()
    await req.services.enrollment.set_labels(req.path_params["name"], body.get("labels"), user,
                                             req.address)
    return ok({"msg": "Labels set"})


def routes() -> list[Route]:
    return [
        Route("/api/v1/enroll", Endpoint({"POST": enroll}, public=("POST",))),
        Route("/api/v1/enroll/{id:int}", Endpoint({"GET": enroll_status}, public=("GET",))),
        Route("/api/v1/agent/hello", Endpoint({"POST": hello})),
        Route("/api/v1/agent/rekey", Endpoint({"POST": new_credential})),
        Route("/api/v1/enrollments", Endpoint({"GET": list_enrollments})),
        Route("/api/v1/enrollments/{id:int}/accept", Endpoint({"POST": accept})),
        Route("/api/v1/enrollments/{id:int}/reject", Endpoint({"POST": reject})),
        Route("/api/v1/enrollment-tokens", Endpoint({"GET": list_tokens, "POST": create_token})),
        Route("/api/v1/enrollment-tokens/{id:int}", Endpoint({"DELETE": revoke_token})),
        Route("/api/v1/agents/{name}/revoke", Endpoint({"POST": revoke_agent})),
        Route("/api/v1/agents/{name}/rekey", Endpoint({"POST": rekey_agent})),
        Route("/api/v1/agents/{name}/adopt", Endpoint({"POST": adopt_agent})),
        Route("/api/v1/agents/{name}/labels", Endpoint({"PUT": set_labels})),
    ]
