"""The OpenAPI description of the socket API, generated from the route table and its models.

Each :class:`Route` names its handler, its query and body models (pydantic) and what it answers
(a model or dataclass, read by pydantic's ``TypeAdapter``); the description is built from those
alone, so a route cannot exist without being described, nor be described as it is not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REF = "#/components/schemas/{model}"
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}
_STATUS_TEXT = {400: "bad request", 404: "not found", 409: "conflict in the task's state",
                413: "request body too large", 503: "the daemon is shutting down"}


@dataclass(frozen=True, slots=True)
class Route:
    """One operation of the API."""

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: Any = None  # what the 2xx answer holds; None: not described further
    ok_status: int = 200
    content_type: str = "application/json"
    errors: tuple[int, ...] = ()


class _Components:
    """Schemas shared by reference; pydantic's ``$defs`` are hoisted here."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}

    def add(self, schema: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        for def_name, sub in schema.pop("$defs", {}).items():
            self.schemas[def_name] = sub
        if name is None:
            return schema
        self.schemas[name] = schema
        return {"$ref": _REF.format(model=name)}

    def model(self, model: type[BaseModel], mode: str = "validation") -> dict[str, Any]:
        schema = model.model_json_schema(ref_template=_REF, mode=mode)  # type: ignore[arg-type]
        return self.add(schema, model.__name__)

    def adapted(self, kind: Any) -> dict[str, Any]:
        schema = TypeAdapter(kind).json_schema(ref_template=_REF, mode="serialization")
        name = getattr(kind, "__name__", None)
        return self.add(schema, name)


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True,
             "schema": {"type": "integer", "minimum": 1}}
            for name in ("task_id", "schedule_id") if "{" + name + "}" in path]


def _query_parameters(model: type[BaseModel] | None) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(ref_template=_REF)
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    def inline(prop: dict[str, Any]) -> dict[str, Any]:
        ref = prop.get("$ref")  # an enum: inlined, a query parameter is one plain value
        return dict(defs[ref.rsplit("/", 1)[1]]) if isinstance(ref, str) else prop

    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = inline(prop)
        if "anyOf" in prop:  # "X or null": a parameter left out is the null
            options = [inline(p) for p in prop.pop("anyOf") if p.get("type") != "null"]
            prop = {**options[0], **prop} if len(options) == 1 else {"anyOf": options, **prop}
        out.append({"name": name, "in": "query", "required": name in required, "schema": prop})
    return out


def _operation(route: Route, components: _Components) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": route.summary}
    if route.response is not None:
        ok["content"] = {route.content_type: {"schema": components.adapted(route.response)}}
    elif route.content_type != "application/json":
        ok["content"] = {route.content_type: {"schema": {"type": "string"}}}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "parameters": _path_parameters(route.path) + _query_parameters(route.query),
        "responses": {str(route.ok_status): ok, **{
            str(status): {"description": _STATUS_TEXT.get(status, "error"), "content": {
                "application/json": {"schema": {"$ref": _REF.format(model="Error")}}}}
            for status in route.errors}},
    }
    if route.body is not None:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": components.model(route.body)}}}
    return operation


def openapi_spec(routes: Iterable[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``routes``."""
    components = _Components()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "corral socket API", "version": "1"},
        "paths": paths,
        "components": {"schemas": components.schemas},
    }
