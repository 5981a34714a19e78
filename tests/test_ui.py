"""The dashboard: its guard with a plain HTTP client, and its pages in a real headless chromium."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from corral.config import LocalModelSettings, Settings, UiSettings
from tests import peers
from tests.conftest import ApiClient, StartDaemon
from tests.daemon_proc import cli
from tests.fakes.base import Hang, Reply
from tests.fakes.openai import FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
MakeSettings = Callable[..., Settings]


async def dashboard(make_settings: MakeSettings, fake: FakeOpenAI, daemon: StartDaemon,
                    **ui: Any) -> tuple[ApiClient, str, Settings]:
    settings = make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"),
                             ui=UiSettings(port=0, **ui))
    _, api = await daemon(settings)
    code, out, err = await cli("ui", "--json", socket=api.socket_path)
    assert code == 0, err
    return api, json.loads(out)["url"], settings


def origin_of(url: str) -> str:
    return url.split("/?")[0]


def browser_session() -> aiohttp.ClientSession:
    # A browser keeps cookies for 127.0.0.1; aiohttp's jar does so only when told.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def test_the_token_the_host_the_origin_and_a_header_for_changes(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon,
) -> None:
    api, url, settings = await dashboard(make_settings, await fake_openai(), daemon)
    site = origin_of(url)
    token = url.split("token=")[1]
    token_file = settings.daemon.socket_path.parent / "ui-token"
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    async with aiohttp.ClientSession() as bare:
        for path in ("/", "/tasks/1", "/events/tasks", "/api/tasks", "/static/app.js"):
            async with bare.get(site + path) as resp:
                assert resp.status == 401, path
        async with bare.get(site + "/?token=wrong") as resp:
            assert resp.status == 401
        async with bare.get(site + "/api/tasks",
                            headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
        async with bare.get(url, allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/"
            cookie = resp.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token in cookie
        for headers in ({"Origin": "http://evil.example"}, {"Host": "evil.example:80"},
                        {"Origin": "http://localhost:1"}):
            async with bare.get(site + "/", headers={"Authorization": f"Bearer {token}",
                                                     **headers}) as resp:
                assert resp.status == 403, headers
    async with browser_session() as browser:
        async with browser.get(url) as resp:
            assert resp.status == 200 and "corral" in await resp.text()
        body = {"prompt": "from the dashboard", "agent": "local"}
        async with browser.post(site + "/api/tasks", json=body) as resp:  # the cookie alone
            assert resp.status == 403
        async with browser.post(site + "/api/tasks", json=body,
                                headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 201
    _, listed = await api.call("GET", "/tasks")
    assert [t["prompt"] for t in listed["tasks"]] == ["from the dashboard"]


async def test_a_port_in_use_leaves_the_socket_serving_and_corral_ui_says_why(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon,
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        settings = make_settings(ui=UiSettings(port=port),
                                 local_model=LocalModelSettings(endpoint=(await fake_openai())
                                                                .endpoint, model="m"))
        _, api = await daemon(settings)
        code, _, err = await cli("ui", socket=api.socket_path)
        assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in err
        assert (await api.submit(prompt="still serving", agent="local"))["id"] == 1
    finally:
        taken.close()


@pytest.mark.real
async def test_the_pages_in_chromium_live_without_reloading(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon, tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    chromium = peers.chromium_bin()
    fake = await fake_openai()
    slow = Reply(text="Hello from the local model, streamed in pieces.", chunks=6,
                 chunk_delay_s=0.4)
    fake.push(slow, Reply(text="A second answer, also in pieces.", chunks=4, chunk_delay_s=0.4),
              Hang())
    api, url, _ = await dashboard(make_settings, fake, daemon)
    site = origin_of(url)
    shots = Path(os.environ.get("CORRAL_SCREENSHOTS_DIR") or tmp_path)
    requested: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium),
                                           args=["--no-sandbox", "--headless=new"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("request", lambda request: requested.append(request.url))
            await page.goto(url)
            assert page.url == site + "/"  # the token left the address bar
            # Submit from the form; its page streams the log and turns succeeded by itself.
            await page.click("text=Submit")
            await page.fill("textarea[name=prompt]", "Say hello from the form")
            await page.select_option("select[name=agent]", "local")
            await page.click("form#submit button")
            await page.wait_for_url(f"{site}/tasks/1")
            await page.wait_for_selector("#log >> text=Hello from the local model")
            await page.wait_for_selector("#task-head[data-state=succeeded]", timeout=30_000)
            await page.screenshot(path=str(shots / "ui-task.png"), full_page=True)
            # The tasks page: a task submitted elsewhere appears and finishes, no reload.
            await page.goto(site + "/")
            await page.wait_for_selector("table.tasks[data-live=on]")
            await page.evaluate("window.sameDocument = true")
            second = await api.submit(prompt="a task from the CLI", agent="local")
            row = f"#task-{second['id']}"
            await page.wait_for_selector(f"{row}[data-state=running]", timeout=30_000)
            await page.wait_for_selector(f"{row}[data-state=succeeded]", timeout=30_000)
            assert await page.evaluate("window.sameDocument") is True
            await page.screenshot(path=str(shots / "ui-tasks.png"), full_page=True)
            # Cancel a running task from its page.
            third = await api.submit(prompt="this one hangs", agent="local")
            await page.goto(f"{site}/tasks/{third['id']}")
            await page.wait_for_selector("#task-head[data-state=running]", timeout=30_000)
            await page.click("button[data-action=cancel]")
            await page.wait_for_selector("#task-head[data-state=cancelled]", timeout=30_000)
            assert (await api.wait(third["id"]))["state"] == "cancelled"
            for path in ("/agents", "/spend"):
                await page.goto(site + path)
                assert await page.locator("h1").count() == 1
        finally:
            await browser.close()
    assert requested and all(u.startswith(site + "/") for u in requested), [
        u for u in requested if not u.startswith(site + "/")]


async def test_a_workspace_tasks_page_shows_its_diff_and_merges_through_the_api(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon, tmp_path: Path,
) -> None:
    from corral.config import LocalAgentSettings
    from tests.fakes.openai import ToolCalls
    from tests.gitrepo import make_repo

    repo = make_repo(tmp_path / "repo")
    fake = await fake_openai()
    fake.push(ToolCalls([("Write", {"file_path": "notes.txt", "content": "hello notes\n"})]),
              Reply(text="wrote the notes"))
    settings = make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"),
                             local_agent=LocalAgentSettings(actions="tools"),
                             ui=UiSettings(port=0))
    _, api = await daemon(settings)
    _, status = await api.call("GET", "/ui")
    url = status["url"]
    token = url.split("token=")[1]
    task = await api.wait((await api.submit(prompt="write notes", agent="local",
                                            workdir=str(repo)))["id"], 60)
    assert task["state"] == "succeeded", task["error"]
    async with browser_session() as browser:
        async with browser.get(url):
            pass
        async with browser.get(f"{origin_of(url)}/tasks/{task['id']}") as resp:
            page = await resp.text()
        assert "<code>notes.txt</code> +1 \u22120" in page  # a minus sign
        assert '<span class="add">+hello notes</span>' in page
        assert 'data-action="merge"' in page and 'data-action="discard"' in page
        async with browser.post(f"{origin_of(url)}/api/tasks/{task['id']}/merge",
                                json={"squash": False},
                                headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200, await resp.text()
    assert (repo / "notes.txt").read_text() == "hello notes\n"
