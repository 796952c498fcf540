"""/openapi.json is an OpenAPI 3.1 description of exactly the routes the app serves."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.routing import Route
from support import RunningServer, http

from dutserver.app import create_app
from dutserver.config import Settings
from dutserver.http.endpoint import Endpoint

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def routed_operations(app: Starlette) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every API route of the app's router; HEAD is implied by GET."""
    ops = set()
    for route in app.routes:
        if isinstance(route, Route) and isinstance(route.endpoint, Endpoint):
            path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
            ops |= {(path, m.lower()) for m in route.endpoint.handlers if m != "HEAD"}
    return ops


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(Settings(db_path=tmp_path / "dut.db", poll_timeout_s=0.2))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield app, c


async def _doc(c: httpx.AsyncClient) -> dict[str, Any]:
    resp = await c.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    doc = resp.json()
    assert isinstance(doc, dict)
    return doc


async def test_is_openapi_3_1(client: tuple[Starlette, httpx.AsyncClient]) -> None:
    _, c = client
    doc = await _doc(c)
    assert re.fullmatch(r"3\.1\.\d+", doc["openapi"]), doc["openapi"]
    assert doc["info"]["title"] and doc["info"]["version"]
    assert isinstance(doc["paths"], dict) and doc["paths"]
    op_ids = []
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        assert set(item) <= HTTP_METHODS | {"parameters", "summary", "description"}, item.keys()
        templated = set(re.findall(r"\{(\w+)\}", path))
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            assert op["responses"], (path, method)
            op_ids.append(op.get("operationId"))
            declared = {p["name"] for p in op.get("parameters", []) + item.get("parameters", [])
                        if p.get("in") == "path"}
            assert declared == templated, (path, method, declared)
            for p in op.get("parameters", []):
                if p.get("in") == "path":
                    assert p["required"] is True
    assert None not in op_ids and len(op_ids) == len(set(op_ids)), "operationIds must be unique"
    _assert_refs_resolve(doc, doc)
    schemes = doc.get("components", {}).get("securitySchemes", {})
    for item in doc["paths"].values():
        for op in item.values():
            for requirement in op.get("security", []) if isinstance(op, dict) else []:
                assert set(requirement) <= set(schemes), requirement


def _assert_refs_resolve(node: Any, doc: dict[str, Any]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            assert ref.startswith("#/"), ref
            target: Any = doc
            for part in ref[2:].split("/"):
                assert isinstance(target, dict) and part in target, f"unresolved $ref {ref}"
                target = target[part]
        for value in node.values():
            _assert_refs_resolve(value, doc)
    elif isinstance(node, list):
        for value in node:
            _assert_refs_resolve(value, doc)


async def test_lists_exactly_the_routed_operations(
        client: tuple[Starlette, httpx.AsyncClient]) -> None:
    app, c = client
    doc = await _doc(c)
    documented = {(path, method) for path, item in doc["paths"].items()
                  for method in item if method in HTTP_METHODS}
    routed = routed_operations(app)
    assert routed, "the app has no API routes?"
    assert documented - routed == set(), "documented but not routed"
    assert routed - documented == set(), "routed but not documented"
    # Sanity of the walk itself: the PROTOCOL rows are among them.
    for expected in [("/login", "get"), ("/login", "post"), ("/tasks", "get"), ("/tasks", "post"),
                     ("/tasks_result", "post"), ("/task_result", "post"), ("/agents", "get"),
                     ("/agents", "post"), ("/agent_selfreg", "get"), ("/agents_selfreg", "post"),
                     ("/logout", "post"), ("/api/v1/tasks", "post"), ("/api/v1/tasks", "get"),
                     ("/api/v1/tasks/{task_id}", "get"), ("/api/v1/tasks/{task_id}/cancel", "post"),
                     ("/api/v1/agents", "get"), ("/api/v1/accounts", "get"),
                     ("/api/v1/accounts", "post"), ("/api/v1/accounts/{name}/password", "post"),
                     ("/api/v1/accounts/{name}", "delete"), ("/api/v1/audit", "get"),
                     ("/healthz", "get"), ("/readyz", "get"), ("/openapi.json", "get")]:
        assert expected in documented, expected


async def test_every_documented_operation_is_answered_by_its_route(
        client: tuple[Starlette, httpx.AsyncClient]) -> None:
    """Calling each documented operation reaches a handler: never the router's 405 or its
    catch-all `Not found`, and never a 500."""
    _, c = client
    doc = await _doc(c)
    for path, item in doc["paths"].items():
        concrete = re.sub(r"\{(task_)?id\}", "1", path)  # the integer ones
        concrete = re.sub(r"\{\w+\}", "someone", concrete)
        for method in item:
            if method not in HTTP_METHODS:
                continue
            resp = await c.request(method.upper(), concrete,
                                   content=b"{}" if method in ("post", "put") else None)
            assert resp.status_code != 500, (method, path, resp.text)
            if resp.status_code == 405:  # a handler's own 405 (self-registration off) is fine
                assert not resp.json()["msg"].startswith("Method "), (method, path, resp.text)
            if resp.status_code == 404:
                assert resp.json()["msg"] != "Not found", (method, path)


async def test_public_operations_carry_no_security(
        client: tuple[Starlette, httpx.AsyncClient]) -> None:
    """PROTOCOL: /login, /healthz, /readyz, /openapi.json, /agent/dutagent.py, enrollment need
    no session;
    everything else does, and the description says so."""
    _, c = client
    doc = await _doc(c)
    # ... and enrollment: the token, or the machine's own credential, is the permission.
    public = {"/login", "/healthz", "/readyz", "/openapi.json", "/agent/dutagent.py",
              "/api/v1/enroll", "/api/v1/enroll/{id}"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            if path in public:
                assert not op.get("security"), (method, path)
            elif path != "/agents" or method != "post":  # self-registration may be anonymous
                assert op.get("security"), (method, path)


def test_real_server_serves_the_same_description(server: RunningServer,
                                                 tmp_path: Path) -> None:
    status, headers, body = http("GET", server.url + "/openapi.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    app = create_app(Settings(db_path=tmp_path / "other.db"))
    documented = {(p, m) for p, item in json.loads(body)["paths"].items() for m in item
                  if m in HTTP_METHODS}
    assert documented == routed_operations(app)
