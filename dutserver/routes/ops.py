"""Operations: health, readiness, the OpenAPI description, the agent program, the web client."""

from __future__ import annotations


from dutserver import __version__
from dutserver.assets import client_program
from dutserver.core.errors import ApiError
from dutserver.http.answer import Reply, ok
from dutserver.http.endpoint import BaseRoute, Endpoint, Mount, Route
from dutserver.http.request import Request
from dutserver.http.static import WebFiles


async def healthz(req: Request) -> Reply:
    """Alive: the process answers."""
    return ok({"status": "alive", "version": __version__})


async def readyz(req: Request) -> Reply:
    """Ready to serve; 503 while shutting down or while the database does not answer."""
    why = await req.services.unready()
    if why is not None:
        raise ApiError(503, why)
    return ok({"status": "ready"})


async def openapi(req: Request) -> Reply:
    """This description of every route."""
    return Reply(200, req.services.openapi, b"application/json")


async def agent_program(req: Request) -> Reply:
    """The agent program, one Python file, for a new PC to fetch."""
    try:
        data = client_program("dutagent.py").read_bytes()
    except OSError:
        raise ApiError(404, "The agent program is not installed with this server") from None
    return Reply(200, data, b"text/x-python; charset=utf-8",
                 {"Content-Disposition": 'attachment; filename="dutagent.py"'})


def routes() -> list[BaseRoute]:
    """Ops routes; the web client's Mount comes last because it answers every other path."""
    public = {"GET"}
    return [
        Route("/healthz", Endpoint({"GET": healthz}, public=public)),
        Route("/readyz", Endpoint({"GET": readyz}, public=public)),
        Route("/openapi.json", Endpoint({"GET": openapi}, public=public)),
        Route("/agent/dutagent.py", Endpoint({"GET": agent_program}, public=public)),
        Mount("/", WebFiles(), name="web"),
    ]
