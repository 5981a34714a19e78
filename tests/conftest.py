"""Fixtures: factories that own their cleanup — fake API servers, real CLIs' environments,
the real llama.cpp server with SmolLM2, stores on real SQLite files, and whole daemons."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from corral.config import (
    ClassifierSettings,
    ClaudeSettings,
    CodexSettings,
    DaemonSettings,
    GeminiSettings,
    LocalModelSettings,
    PoolSettings,
    Settings,
    UiSettings,
)
from corral.daemon import running_daemon
from corral.executor.pool import Pool
from corral.storage.base import Store
from corral.storage.postgres import PostgresStore
from corral.storage.sqlite import SqliteStore
from tests import peers, pg
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai import FakeOpenAI
from tests.fakes.responses import FakeResponses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real llama.cpp server with SmolLM2 on a free loopback port; yields ``…/v1``."""
    binary = peers.llama_server_bin()
    model = peers.smollm2_model()
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "llama-server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
             "--ctx-size", "8192", "--parallel", "4", "--threads", "2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 120
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-cpp-server exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310
                    if json.loads(resp.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-cpp-server not healthy within 120s; see {log_path}")
            time.sleep(0.2)
        yield f"{url}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
async def fake_openai() -> AsyncIterator[Callable[[], Awaitable[FakeOpenAI]]]:
    started: list[FakeOpenAI] = []

    async def make() -> FakeOpenAI:
        server = await FakeOpenAI().start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.close()


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    server = await FakeAnthropic().start()
    yield server
    await server.close()


@pytest.fixture
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    server = await FakeGemini().start()
    yield server
    await server.close()


@pytest.fixture
def claude_env(tmp_path: Path, fake_anthropic: FakeAnthropic) -> dict[str, str]:
    """What the real claude CLI needs to run offline against the fake Anthropic server."""
    home = tmp_path / "claude-home"
    home.mkdir()
    return {"PATH": os.environ["PATH"], "HOME": str(home),
            "ANTHROPIC_BASE_URL": fake_anthropic.url, "ANTHROPIC_API_KEY": "sk-test-claude-key",
            "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}


@pytest.fixture
def gemini_env(tmp_path: Path, fake_gemini: FakeGemini) -> dict[str, str]:
    """What the real gemini CLI needs to run offline against the fake Gemini server."""
    home = tmp_path / "gemini-home"
    (home / ".gemini").mkdir(parents=True)
    (home / ".gemini" / "settings.json").write_text(
        json.dumps({"security": {"auth": {"selectedType": "gemini-api-key"}}})
    )
    return {"PATH": os.environ["PATH"], "HOME": str(home), "GEMINI_API_KEY": "test-gemini-key",
            "GOOGLE_GEMINI_BASE_URL": fake_gemini.url}


@pytest.fixture
async def fake_responses() -> AsyncIterator[FakeResponses]:
    server = await FakeResponses().start()
    yield server
    await server.close()


@pytest.fixture
def codex_home() -> Iterator[Path]:
    """A CODEX_HOME of the test's own, outside /tmp (codex's sandbox fails for one under it)."""
    base = Path("/var/tmp")
    home = Path(tempfile.mkdtemp(prefix="corral-codex-", dir=base if base.is_dir() else None))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def codex_settings(fake_responses: FakeResponses, codex_home: Path) -> CodexSettings:
    """The real codex CLI pointed at the fake Responses API through a provider of its own."""
    provider = (f'model_providers.fake={{name="fake", base_url="{fake_responses.base_url}",'
                ' env_key="FAKE_CODEX_KEY", wire_api="responses", request_max_retries=0,'
                ' stream_max_retries=0, supports_websockets=false}')
    return CodexSettings(
        binary=str(peers.codex_bin()), model="gpt-5.5",
        extra_args=["-c", "model_provider=fake", "-c", provider, "-c", "features.plugins=false",
                    "-c", "analytics.enabled=false"],
        env={"CODEX_HOME": str(codex_home), "HOME": str(codex_home),
             "FAKE_CODEX_KEY": "sk-test-codex-key"})


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "corral.db") as s:
        yield s


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.PgCluster]:
    """One throwaway PostgreSQL server for the session; each test takes a database of its own."""
    with pg.cluster() as made:
        yield made


MakeStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeStore]:
    """Stores of one backend (the test runs once for each) on one queue: every store made in
    a test shares the same SQLite file or PostgreSQL database, as daemons would."""
    stack = contextlib.AsyncExitStack()
    url = (await request.getfixturevalue("pg_cluster").new_database()
           if request.param == "postgres" else None)
    made = 0

    async def make(**options: Any) -> Store:
        nonlocal made
        made += 1
        if url is None:
            options.pop("node_id", None)
            return await stack.enter_async_context(SqliteStore(tmp_path / "corral.db", **options))
        options.setdefault("node_id", f"node-{made}")
        return await stack.enter_async_context(PostgresStore(url, **options))

    async with stack:
        yield make


@pytest.fixture
def socket_path() -> Iterator[Callable[[], Path]]:
    """Short socket paths (AF_UNIX allows ~108 bytes), their folders removed afterwards."""
    made: list[Path] = []

    def make() -> Path:
        folder = Path(tempfile.gettempdir()) / f"corral-t{os.getpid()}-{time.monotonic_ns()}"
        made.append(folder)
        return folder / "corral.sock"

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def make_settings(
    tmp_path: Path, socket_path: Callable[[], Path]
) -> Callable[..., Settings]:
    """Settings for a daemon in ``tmp_path``; keyword arguments replace whole sections."""

    def make(**sections: Any) -> Settings:
        base: dict[str, Any] = {
            "daemon": DaemonSettings(socket_path=socket_path(),
                                     data_dir=tmp_path / "data", shutdown_grace_seconds=2.0),
            "pool": PoolSettings(retry_base_seconds=0.05, retry_max_seconds=0.2,
                                 cooldown_default_seconds=1.0, kill_grace_seconds=1.0),
            "claude": ClaudeSettings(enabled=False),
            "gemini": GeminiSettings(enabled=False),
            "codex": CodexSettings(enabled=False),
            "local_model": LocalModelSettings(),
            "classifier": ClassifierSettings(),
            "ui": UiSettings(port=0),  # a free port: daemons of tests never collide
        }
        base.update(sections)
        return Settings(**base)

    return make


class ApiClient:
    """An async client for the daemon's socket (tests run inside the event loop)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path)))

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.session.request(method, f"http://corral{path}", **kwargs) as resp:
            raw = await resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw

    async def submit(self, **body: Any) -> dict[str, Any]:
        status, task = await self.call("POST", "/tasks", json=body)
        assert status == 201, task
        return dict(task)

    async def wait(self, task_id: int, timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            status, task = await self.call("GET", f"/tasks/{task_id}/wait",
                                           params={"timeout_s": "5"})
            assert status == 200, task
            if task["state"] in ("succeeded", "failed", "cancelled"):
                return dict(task)
            assert time.monotonic() < deadline, f"task {task_id} not final: {task}"

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
async def api_client() -> AsyncIterator[Callable[[Path], ApiClient]]:
    clients: list[ApiClient] = []

    def make(socket_path: Path) -> ApiClient:
        client = ApiClient(socket_path)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


Daemon = tuple[Pool, ApiClient]
StartDaemon = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def daemon(api_client: Callable[[Path], ApiClient]) -> AsyncIterator[StartDaemon]:
    """Starts daemons in this test's loop (``start(settings, env, **running_daemon_kwargs)``);
    all of them stop when the test ends."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(settings: Settings, env: dict[str, str] | None = None,
                        **kwargs: Any) -> Daemon:
            pool = await stack.enter_async_context(running_daemon(settings, env or {}, **kwargs))
            return pool, api_client(settings.daemon.socket_path)

        yield start


async def until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 20.0,
                every_s: float = 0.02) -> None:
    """Poll ``predicate`` until true, failing at the deadline (never a blind sleep)."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(every_s)
