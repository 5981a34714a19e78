"""The real daemon as a process, driven through the real `corral` CLI and its raw socket."""

from __future__ import annotations

import asyncio
import io
import json
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import ApiClient
from tests.daemon_proc import DaemonProcess, cli
from tests.fakes.base import Reply
from tests.fakes.openai import FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]


@pytest.fixture
async def daemon_config(
    tmp_path: Path, fake_openai: MakeFake, socket_path: Callable[[], Path]
) -> tuple[Path, Path, FakeOpenAI]:
    fake = await fake_openai()
    fake.default = Reply(text="Bonjour!", input_tokens=5, output_tokens=3)
    sock = socket_path()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nsocket_path = "{sock}"\ndata_dir = "{tmp_path / "data"}"\n'
        'shutdown_grace_seconds = 2.0\n'
        f'[local_model]\nendpoint = "{fake.endpoint}"\nmodel = "fake-model"\n'
        '[claude]\nenabled = false\n[gemini]\nenabled = false\n'
    )
    return config, sock, fake


@pytest.fixture
async def daemon_proc(
    daemon_config: tuple[Path, Path, FakeOpenAI],
) -> AsyncIterator[DaemonProcess]:
    config, sock, _ = daemon_config
    daemon = DaemonProcess(config, sock)
    await daemon.start()
    yield daemon
    await daemon.stop()


async def test_submit_ls_show_survive_restart(daemon_proc: DaemonProcess) -> None:
    sock = daemon_proc.socket_path
    code, out, err = await cli("submit", "hello", "--agent", "local", "--json", socket=sock)
    assert code == 0, err
    task = json.loads(out)
    assert task["state"] == "queued" and task["id"] >= 1
    code, out, _ = await cli("submit", "again", "--agent", "local", "--wait", "--json",
                             socket=sock)
    assert code == 0
    waited = json.loads(out)
    assert waited["state"] == "succeeded"
    execution = waited["executions"][0]
    for key in ("status", "cost_usd", "tokens_in", "tokens_out", "summary", "files_changed",
                "insertions", "deletions", "error"):
        assert key in execution
    assert (execution["summary"], execution["tokens_in"], execution["tokens_out"]) == (
        "Bonjour!", 5, 3)
    code, out, _ = await cli("ls", "--json", socket=sock)
    assert task["id"] in [t["id"] for t in json.loads(out)]
    code, out, _ = await cli("ls", socket=sock)
    assert "hello" in out and "succeeded" in out
    code, out, _ = await cli("show", str(task["id"]), "--json", socket=sock)
    shown = json.loads(out)
    assert shown["prompt"] == "hello" and isinstance(shown["executions"], list)
    code, out, _ = await cli("logs", str(waited["id"]), socket=sock)
    assert code == 0 and "Bonjour!" in out and "done" in out
    code, out, _ = await cli("logs", str(waited["id"]), "--raw", socket=sock)
    assert json.loads(out.splitlines()[-1])["type"] == "result"

    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert await daemon_proc.stop() == 0
    assert not sock.exists()
    await daemon_proc.start()
    code, out, _ = await cli("show", str(task["id"]), "--json", socket=sock)
    assert code == 0 and json.loads(out)["prompt"] == "hello"


async def test_prompt_from_stdin_and_client_errors(daemon_proc: DaemonProcess) -> None:
    sock = daemon_proc.socket_path
    code, out, _ = await cli("submit", "-", "--agent", "local", "--json", socket=sock,
                             stdin=b"prompt from stdin")
    assert code == 0 and json.loads(out)["prompt"] == "prompt from stdin"
    code, _, err = await cli("submit", "x", "--agent", "robot", socket=sock)
    assert code == 1 and "unknown agent 'robot'" in err and "claude, gemini, codex, local" in err
    code, _, err = await cli("show", "999999", socket=sock)
    assert code == 1 and "does not exist" in err
    code, _, err = await cli("submit", "x", "--dir", "/nonexistent/dir", socket=sock)
    assert code == 1 and "does not exist" in err
    code, _, err = await cli("submit", socket=sock)
    assert code == 2


async def test_daemon_not_running_exit_3(tmp_path: Path) -> None:
    code, _, err = await cli("ls", socket=tmp_path / "nothing.sock")
    assert code == 3 and "corral serve" in err


async def test_second_daemon_refused_and_stale_socket_replaced(
    daemon_proc: DaemonProcess,
) -> None:
    second = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "serve", "--config", str(daemon_proc.config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 2
    assert "another corral daemon is already serving" in err.decode()
    # A daemon killed outright leaves its socket behind; the next one replaces it.
    assert daemon_proc.proc is not None
    daemon_proc.proc.kill()
    await daemon_proc.proc.wait()
    assert daemon_proc.socket_path.exists()
    await daemon_proc.start()


RawCall = Callable[..., Awaitable[tuple[int, Any]]]


@pytest.fixture
async def raw(
    daemon_proc: DaemonProcess, api_client: Callable[[Path], ApiClient]
) -> RawCall:
    return api_client(daemon_proc.socket_path).call


@pytest.mark.parametrize("body, status, code, needle", [
    (b"{not json", 400, "malformed_json", "not valid JSON"),
    (b"\xff\xfe", 400, "malformed_json", "UTF-8"),
    (b"[1, 2]", 400, "bad_request", "JSON object"),
    (b'{"agent": "local"}', 400, "missing_prompt", "prompt is required"),
    (b'{"prompt": ""}', 400, "invalid_task", "prompt"),
    (b'{"prompt": "a\\u0000b"}', 400, "invalid_task", "NUL"),
    (b'{"prompt": 5}', 400, "invalid_task", "prompt"),
    (b'{"prompt": "x", "priority": "high"}', 400, "invalid_task", "priority"),
    (b'{"prompt": "x", "timeout_s": -1}', 400, "invalid_task", "timeout_s"),
    (b'{"prompt": "x", "max_retries": 1000000}', 400, "invalid_task", "max_retries"),
    (b'{"prompt": "x", "agent": "robot"}', 400, "unknown_agent", "known agents"),
    (b'{"prompt": "x", "colour": "red"}', 400, "invalid_task", "unknown field"),
    (b'{"prompt": "x", "workdir": "relative/path"}', 400, "invalid_task", "absolute"),
    (b'{"prompt": "x", "workdir": "/etc/hostname"}', 400, "invalid_task", "not a directory"),
])
async def test_bad_requests_get_clear_4xx(
    raw: RawCall, body: bytes, status: int, code: str, needle: str
) -> None:
    got, answer = await raw("POST", "/tasks", data=body,
                            headers={"Content-Type": "application/json"})
    assert got == status, answer
    assert answer["error"]["code"] == code
    assert needle in answer["error"]["message"]


async def test_body_over_limit_is_413_and_daemon_keeps_serving(raw: RawCall) -> None:
    big = json.dumps({"prompt": "x" * (9 * 1024 * 1024)}).encode()
    status, answer = await raw("POST", "/tasks", data=io.BytesIO(big),
                               headers={"Content-Type": "application/json"})
    assert status == 413 and answer["error"]["code"] == "payload_too_large"
    ok = json.dumps({"prompt": "y" * (5 * 1024 * 1024), "agent": "local"}).encode()
    status, task = await raw("POST", "/tasks", data=io.BytesIO(ok),
                             headers={"Content-Type": "application/json"})
    assert status == 201 and len(task["prompt"]) == 5 * 1024 * 1024


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/tasks/999999", 404),
    ("GET", "/tasks/../../etc/passwd/log", 404),
    ("GET", "/tasks/..%2F..%2Fetc%2Fpasswd/log", 404),
    ("GET", "/tasks/abc", 404),
    ("GET", "/tasks/%C2%B2/log", 404),  # "²" is a digit to str.isdigit, not to int()
    ("POST", "/tasks/999999/cancel", 404),
    ("POST", "/tasks/999999/retry", 404),
    ("GET", "/tasks?state=weird", 400),
    ("GET", "/tasks?limit=-1", 400),
    ("GET", "/nowhere", 404),
    ("DELETE", "/tasks", 405),
])
async def test_bad_paths(raw: RawCall, method: str, path: str, status: int) -> None:
    got, answer = await raw(method, path)
    assert got == status
    assert set(answer["error"]) == {"code", "message"}


async def test_health_agents_stats_openapi(raw: RawCall) -> None:
    status, health = await raw("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    _, agents = await raw("GET", "/agents")
    by_name = {a["name"]: a for a in agents["agents"]}
    assert by_name["local"]["registered"] and not by_name["claude"]["registered"]
    _, stats = await raw("GET", "/stats")
    assert "queued" in stats["tasks"]
    _, spec = await raw("GET", "/openapi.json")
    assert "/tasks" in spec["paths"]


async def test_answers_are_what_the_openapi_description_says(raw: RawCall) -> None:
    _, spec = await raw("GET", "/openapi.json")
    assert "timeout_s" in {p["name"] for p in
                           spec["paths"]["/tasks/{task_id}/wait"]["get"]["parameters"]}

    def check(value: Any, name: str) -> None:
        jsonschema.validate(value, {"$ref": f"#/components/schemas/{name}",
                                    "components": spec["components"]})

    status, task = await raw("POST", "/tasks", json={"prompt": "describe me", "agent": "local"})
    assert status == 201
    check(task, "Task")
    _, done = await raw("GET", f"/tasks/{task['id']}/wait", params={"timeout_s": "30"})
    assert done["state"] == "succeeded" and done["executions"]
    check(done, "Task")
    _, listing = await raw("GET", "/tasks", params={"state": "succeeded"})
    check(listing, "TaskList")
    status, error = await raw("GET", "/tasks", params={"limit": "0"})
    assert status == 400
    check(error, "Error")
    with pytest.raises(jsonschema.ValidationError):  # the check itself can fail
        check({**done, "state": "exploded"}, "Task")
