"""OpenAPI 3.1 from the routing table itself, so no route can be left out."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.routing import BaseRoute, Route

from dutserver import __version__
from dutserver.http.endpoint import Endpoint


def build_openapi(routes: list[BaseRoute]) -> bytes:
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
