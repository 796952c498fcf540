"""Operations: health, readiness, the OpenAPI description, the agent program, the web client."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from dutserver import __version__
from dutserver.assets import client_program, web_dir
from dutserver.errors import ApiError
from starlette.types import Message, Receive, Scope, Send

from dutserver.routes.common import Endpoint, Reply, Request, ok, send_reply


async def healthz(req: Request) -> Reply:
    """Alive: the process answers."""
    return ok({"status": "alive", "version": __version__})


async def readyz(req: Request) -> Reply:
    """Ready to serve; 503 while shutting down."""
    if req.state["dispatcher"].closing:
        raise ApiError(503, "Shutting down")
    return ok({"status": "ready"})


async def openapi(req: Request) -> Reply:
    """This description of every route."""
    return Reply(200, req.state["openapi"], b"application/json")


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


class WebFiles:
    """The web client's files; any other method than GET/HEAD is 405 on a file, 404 elsewhere.

    (StaticFiles alone answers 405 for every path, so a mistyped API path would look like a
    wrong method.)"""

    def __init__(self) -> None:
        self.root = web_dir()
        self.files = StaticFiles(directory=self.root, html=True, check_dir=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in ("GET", "HEAD"):
            async def revalidate(message: Message) -> None:
                # no-cache: the browser keeps the files but asks (ETag) whether they changed,
                # so an upgraded server never runs with yesterday's scripts.
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()),
                                          (b"cache-control", b"no-cache")]
                await send(message)
            await self.files(scope, receive, revalidate)
            return
        relative = scope["path"][len(scope.get("root_path", "")):].lstrip("/") or "index.html"
        try:
            target = (self.root / relative).resolve()
            exists = target.is_file() and target.is_relative_to(self.root.resolve())
        except (ValueError, OSError):  # a NUL byte, a name too long: no such file
            exists = False
        error = (ApiError(405, f"Method {scope['method']} not allowed; use GET", {"Allow": "GET"})
                 if exists else ApiError(404, "Not found"))
        await send_reply(send, Reply(error.status, error.body(), b"application/json",
                                     error.headers))


def build_openapi(routes: list[BaseRoute]) -> bytes:
    """OpenAPI 3.1 from the routing table itself, so no route can be left out."""
    paths: dict[str, Any] = {}
    for route in routes:
        if not isinstance(route, Route) or not isinstance(route.endpoint, Endpoint):
            continue
        endpoint = route.endpoint
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        params = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "integer" if conv == ":int" else "string"}}
                  for name, conv in re.findall(r"\{(\w+)(:\w+)?\}", route.path)]
        item: dict[str, Any] = {}
        for method, handler in endpoint.handlers.items():
            if method == "HEAD":
                continue
            text = " ".join((handler.__doc__ or handler.__name__).split())
            op: dict[str, Any] = {
                "summary": text.split(". ")[0].rstrip("."),
                "description": text,
                "operationId": f"{method.lower()}_{handler.__name__}_{len(paths)}",
                "responses": {"200": {"description": "Success"},
                              "default": {"description": "Error",
                                          "content": {"application/json": {
                                              "schema": {"$ref": "#/components/schemas/Error"}}}}},
            }
            if params:
                op["parameters"] = params
            if method not in endpoint.public:
                op["security"] = [{"session": []}, {"agent": []}]
            if method in ("POST", "PUT"):
                op["requestBody"] = {"required": False, "content": {
                    "application/json": {"schema": {"type": "object"}}}}
            item[method.lower()] = op
        paths[path] = item
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "dutserver", "version": __version__,
                 "description": "Classic dutserver protocol and the native API (/api/v1)."},
        "paths": paths,
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error", "msg"], "properties": {
                "error": {"type": "boolean", "const": True}, "msg": {"type": "string"}}}},
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "header", "name": "Authorization",
                            "description": "the token from /login"},
                "agent": {"type": "http", "scheme": "basic"}},
        },
    }
    return json.dumps(doc, indent=1).encode()
