"""The OpenAPI description of the socket API, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _ok(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
        for s in statuses
    }


_TASK_ID = {"name": "task_id", "in": "path", "required": True,
            "schema": {"type": "integer", "minimum": 1}}


def openapi_spec() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "corral socket API", "version": "1"},
        "paths": {
            "/tasks": {
                "post": {
                    "operationId": "createTask",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/TaskCreate"}}}},
                    "responses": {"201": _ok("the stored task"), **_errors(400, 413, 503)},
                },
                "get": {
                    "operationId": "listTasks",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string", "enum": [
                            "queued", "running", "succeeded", "failed", "cancelled"]}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
                    ],
                    "responses": {"200": _ok("tasks, newest first"), **_errors(400)},
                },
            },
            "/tasks/{task_id}": {"get": {
                "operationId": "showTask", "parameters": [_TASK_ID],
                "responses": {"200": _ok("the task with its executions"), **_errors(404)}}},
            "/tasks/{task_id}/cancel": {"post": {
                "operationId": "cancelTask", "parameters": [_TASK_ID],
                "responses": {"200": _ok("the cancelled task"), **_errors(404, 409)}}},
            "/tasks/{task_id}/retry": {"post": {
                "operationId": "retryTask", "parameters": [_TASK_ID],
                "responses": {"200": _ok("the requeued task"), **_errors(404, 409)}}},
            "/tasks/{task_id}/log": {"get": {
                "operationId": "taskLog", "parameters": [_TASK_ID,
                    {"name": "execution", "in": "query", "schema": {"type": "integer"}},
                    {"name": "follow", "in": "query", "schema": {"type": "string",
                                                                 "enum": ["0", "1"]}}],
                "responses": {"200": {"description": "stream-json lines"}, **_errors(400, 404)}}},
            "/agents": {"get": {"operationId": "agents", "responses": {"200": _ok("agents")}}},
            "/stats": {"get": {"operationId": "stats", "responses": {"200": _ok("stats")}}},
            "/health": {"get": {"operationId": "health", "responses": {"200": _ok("health")}}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            "TaskCreate": {
                "type": "object", "required": ["prompt"], "additionalProperties": False,
                "properties": {
                    "prompt": {"type": "string", "minLength": 1},
                    "agent": {"type": "string", "enum": ["claude", "gemini", "local", "auto"]},
                    "model": {"type": "string", "maxLength": 200},
                    "workdir": {"type": "string"},
                    "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "timeout_s": {"type": "number", "exclusiveMinimum": 0},
                    "max_retries": {"type": "integer", "minimum": 0, "maximum": 100},
                },
            },
        }},
    }
