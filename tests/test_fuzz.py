"""Fuzz the socket API from its own OpenAPI description: every route, no input gets a 5xx."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.server.app import ROUTES
from corral.server.client import ApiError, CorralClient
from corral.server.openapi import openapi_spec

SPEC = openapi_spec(ROUTES)
SCHEMAS = SPEC["components"]["schemas"]
OPERATIONS = sorted((path, method) for path, ops in SPEC["paths"].items() for method in ops)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


def typed(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of the declared type, and near misses."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | st.text(max_size=10)
    kind = schema.get("type")
    if "anyOf" in schema:
        kind = next((s.get("type") for s in schema["anyOf"] if s.get("type") != "null"), None)
    if kind == "string":
        return st.text(max_size=200)
    if kind == "integer":
        return st.integers(min_value=-(2**70), max_value=2**70)
    if kind == "number":
        return st.floats(allow_nan=False) | st.integers()
    if kind == "boolean":
        return st.booleans()
    return JSON


def body_strategy(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    fields = {name: typed(sub) | JSON for name, sub in schema.get("properties", {}).items()}
    objects = st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda d: st.dictionaries(st.text(max_size=8), JSON, max_size=2).map(
            lambda extra: {**extra, **d}))
    return objects | JSON


def text_of(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def query_strategy(operation: dict[str, Any]) -> st.SearchStrategy[dict[str, str]]:
    params = {p["name"]: typed(p["schema"]).map(text_of) | st.text(max_size=12)
              for p in operation["parameters"] if p["in"] == "query"}
    params["x"] = st.text(max_size=12)  # an undeclared parameter is ignored, not an error
    return st.fixed_dictionaries({}, optional=params)


@pytest.fixture(scope="module")
def daemon_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("fuzz")
    sock = Path(tempfile.mkdtemp(prefix="corral-fz")) / "corral.sock"
    config = tmp / "config.toml"
    # No agent at all: tasks are stored and fail fast, which is all the fuzz needs.
    config.write_text(f'[daemon]\nsocket_path = "{sock}"\ndata_dir = "{tmp / "data"}"\n'
                      'log_level = "ERROR"\n[claude]\nenabled = false\n'
                      "[gemini]\nenabled = false\n")
    proc = subprocess.Popen([sys.executable, "-m", "corral.cli", "serve", "--config",
                             str(config)])
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.05)
    client = CorralClient(str(sock), timeout_s=30)
    for n in range(3):  # a few tasks, so ids 1..3 exist and routes get past their 404
        client.request("POST", "/tasks", {"prompt": f"fuzz {n}"})
    yield sock
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    shutil.rmtree(sock.parent, ignore_errors=True)


def call(sock: Path, method: str, path: str, body: Any = None) -> int:
    client = CorralClient(str(sock), timeout_s=90)
    try:
        client.request(method, path, body)
    except ApiError as exc:
        assert exc.status < 500, f"{method} {path} {json.dumps(body)[:200]} -> {exc.message}"
        assert exc.code and exc.message
        return exc.status
    return 200


def test_every_route_is_described_and_fuzzed() -> None:
    served = {(r.path, r.method.lower()) for r in ROUTES}
    assert served == set(OPERATIONS)
    assert ("/tasks/{task_id}/wait", "get") in served


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=body_strategy(SCHEMAS["TaskCreate"]))
def test_create_task_never_5xx(daemon_socket: Path, body: Any) -> None:
    call(daemon_socket, "POST", "/tasks", body)


@pytest.mark.parametrize("template, method", OPERATIONS)
@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(),
       raw_id=st.sampled_from(["1", "2", "3"]) | st.text(max_size=30)
       | st.integers(min_value=-(2**64), max_value=2**64).map(str))
def test_paths_and_queries_never_5xx(
    daemon_socket: Path, template: str, method: str, data: st.DataObject, raw_id: str
) -> None:
    operation = SPEC["paths"][template][method]
    query = data.draw(query_strategy(operation))
    if "timeout_s" in query:  # waiting is the route's job; the fuzz does not wait a minute
        query["timeout_s"] = "0"
    path = template.replace("{task_id}", quote(raw_id, safe="") or "0")
    suffix = f"?{urlencode(query)}" if query else ""
    body = None
    if "requestBody" in operation:
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = data.draw(body_strategy(SCHEMAS[ref.rsplit("/", 1)[1]]))
    elif method == "post":
        body = {}
    call(daemon_socket, method.upper(), path + suffix, body)
