"""Fuzz the socket API from its own OpenAPI description: no input gets a 5xx."""

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
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.server.client import ApiError, CorralClient
from corral.server.openapi import openapi_spec

SPEC = openapi_spec()

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


def typed(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    kind = schema.get("type")
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | st.text(max_size=10)
    if kind == "string":
        return st.text(max_size=200)
    if kind == "integer":
        return st.integers(min_value=-(2**70), max_value=2**70)
    if kind == "number":
        return st.floats(allow_nan=False) | st.integers()
    return JSON


def body_strategy() -> st.SearchStrategy[Any]:
    schema = SPEC["components"]["schemas"]["TaskCreate"]
    fields = {name: typed(sub) | JSON for name, sub in schema["properties"].items()}
    objects = st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda d: st.dictionaries(st.text(max_size=8), JSON, max_size=2).map(
            lambda extra: {**extra, **d}))
    return objects | JSON


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
    yield sock
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    shutil.rmtree(sock.parent, ignore_errors=True)


def call(sock: Path, method: str, path: str, body: Any = None) -> int:
    client = CorralClient(str(sock), timeout_s=30)
    try:
        client.request(method, path, body)
    except ApiError as exc:
        assert exc.status < 500, f"{method} {path} {json.dumps(body)[:200]} -> {exc.message}"
        assert exc.code and exc.message
        return exc.status
    return 200


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=body_strategy())
def test_create_task_never_5xx(daemon_socket: Path, body: Any) -> None:
    call(daemon_socket, "POST", "/tasks", body)


@settings(max_examples=200, deadline=None)
@given(
    template=st.sampled_from(sorted(SPEC["paths"])),
    raw_id=st.text(max_size=30) | st.integers(min_value=-(2**64), max_value=2**64).map(str),
    query=st.dictionaries(st.sampled_from(["state", "limit", "follow", "execution", "x"]),
                          st.text(max_size=12), max_size=3),
)
def test_paths_and_queries_never_5xx(
    daemon_socket: Path, template: str, raw_id: str, query: dict[str, str]
) -> None:
    path = template.replace("{task_id}", quote(raw_id, safe="") or "0")
    methods = [m.upper() for m in SPEC["paths"][template]]
    from urllib.parse import urlencode

    for method in methods:
        suffix = f"?{urlencode(query)}" if query and method == "GET" else ""
        call(daemon_socket, method, path + suffix, {} if method == "POST" else None)
