"""Only the daemon's user gets in; keys never leak; prompts never meet a shell."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.config import ClaudeSettings, GeminiSettings, LocalModelSettings
from corral.daemon import running_daemon
from tests import peers
from tests.conftest import ApiClient
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import Status
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai import EchoAuth, FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
NOBODY = 65534


def request_as(uid: int, sock: Path) -> bytes:
    """GET /health over the socket from a child process running as ``uid``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to uid, ask, report through the pipe
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            os.write(write_end, data)
        except OSError as exc:
            os.write(write_end, f"OSError {exc.errno}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as fh:
        return fh.read()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
async def test_other_users_are_refused(
    make_settings: Callable[..., Any], fake_openai: MakeFake
) -> None:
    fake = await fake_openai()
    settings = make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"))
    sock = settings.daemon.socket_path
    async with running_daemon(settings, {}):
        # The daemon answers on this event loop: ask from a thread so the loop keeps running.
        # First: a 0600 socket in a 0700 folder keeps the stranger out at the file level.
        assert b"OSError 13" in await asyncio.to_thread(request_as, NOBODY, sock)
        # Even with the file modes opened up, the peer-credential check refuses the stranger.
        os.chmod(sock.parent, 0o755)  # noqa: S103 - deliberately opened for the test
        os.chmod(sock, 0o666)  # noqa: S103
        answer = await asyncio.to_thread(request_as, NOBODY, sock)
        assert answer.startswith(b"HTTP/1.1 403")
        assert b"only the daemon's own user" in answer
        assert (await asyncio.to_thread(request_as, 0, sock)).startswith(b"HTTP/1.1 200")


@pytest.mark.real
async def test_planted_keys_never_leak(
    tmp_path: Path, make_settings: Callable[..., Any], fake_openai: MakeFake,
    fake_anthropic: FakeAnthropic, claude_env: dict[str, str],
    api_client: Callable[[Path], ApiClient], caplog: pytest.LogCaptureFixture,
) -> None:
    local_key = "sk-local-planted-4f7a9c"
    claude_key = claude_env["ANTHROPIC_API_KEY"] = "sk-ant-planted-8b2d61"
    fake = await fake_openai()
    fake.push(EchoAuth())
    fake_anthropic.default = Status(400, body={"type": "error", "error": {
        "type": "invalid_request_error", "message": "rejected"}})
    settings = make_settings(
        local_model=LocalModelSettings(endpoint=fake.endpoint, model="m",
                                       api_key=local_key),
        claude=ClaudeSettings(binary=str(peers.claude_bin())),
    )
    with caplog.at_level("DEBUG"):
        async with running_daemon(settings, claude_env):
            api = api_client(settings.daemon.socket_path)
            local = await api.wait((await api.submit(prompt="x", agent="local",
                                                     max_retries=0))["id"])
            claude = await api.wait((await api.submit(prompt="y", agent="claude",
                                                      max_retries=0))["id"], 90)
            answers = json.dumps([local, claude, (await api.call("GET", "/tasks"))[1]])
    assert local["state"] == "failed" and "bad key Bearer ***" in local["error"]
    assert claude["state"] == "failed"
    config = tmp_path / "c.toml"
    config.write_text(f'[local_model]\nendpoint = "http://x/v1"\napi_key = "{local_key}"\n'
                      f'[claude.env]\nANTHROPIC_API_KEY = "{claude_key}"\n')
    shown = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "config", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await shown.communicate()
    assert shown.returncode == 0
    haystacks = [answers, caplog.text, out.decode(), err.decode()]
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            haystacks.append(path.read_bytes().decode("utf-8", "replace"))
    for key in (local_key, claude_key):
        for text in haystacks:
            assert key not in text


@pytest.mark.real
async def test_prompts_never_reach_a_shell(
    tmp_path: Path, make_settings: Callable[..., Any], fake_openai: MakeFake,
    fake_anthropic: FakeAnthropic, fake_gemini: FakeGemini, claude_env: dict[str, str],
    gemini_env: dict[str, str], api_client: Callable[[Path], ApiClient],
) -> None:
    marker = tmp_path / "pwned"
    prompt = f'$(touch {marker}) `touch {marker}`; touch {marker} && echo "$HOME" | cat'
    fake = await fake_openai()
    settings = make_settings(
        local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"),
        claude=ClaudeSettings(binary=str(peers.claude_bin())),
        gemini=GeminiSettings(binary=str(peers.gemini_bin())),
    )
    async with running_daemon(settings, {**claude_env, **gemini_env}):
        api = api_client(settings.daemon.socket_path)
        for agent in ("claude", "gemini"):
            done = await api.wait((await api.submit(prompt=prompt, agent=agent))["id"], 90)
            assert done["state"] == "succeeded", done
    assert not marker.exists()
    claude_text = json.dumps(fake_anthropic.requests[-1]["messages"])
    assert json.dumps(prompt)[1:-1] in claude_text
    gemini_text = json.dumps(fake_gemini.requests[-1]["contents"])
    assert json.dumps(prompt)[1:-1] in gemini_text


def test_a_socket_folder_open_to_others_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    from corral.daemon import UnsafeSocketFolder, prepare_socket

    folder = tmp_path / "run"
    folder.mkdir()
    os.chmod(folder, 0o777)  # noqa: S103 - the unsafe folder under test
    with pytest.raises(UnsafeSocketFolder, match="open to other users"):
        prepare_socket(folder / "corral.sock")
    assert folder.stat().st_mode & 0o777 == 0o777  # never chmod-ed behind the user's back
    fresh = tmp_path / "new" / "corral"
    prepare_socket(fresh / "corral.sock")
    assert fresh.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_a_socket_folder_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    from corral.daemon import UnsafeSocketFolder, prepare_socket

    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(UnsafeSocketFolder, match=f"belongs to uid {NOBODY}"):
        prepare_socket(folder / "corral.sock")
    assert folder.stat().st_uid == NOBODY and folder.stat().st_mode & 0o777 == 0o700


def serve_as(uid: int, sock: Path, ready: Any) -> int:
    """A child listening on ``sock`` as ``uid`` that answers any request with a fake task."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            server.listen(1)  # the credentials a client sees are the listener's
            os.write(ready, b"x")
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            conn.close()
        finally:
            os._exit(0)
    server.close()
    return pid


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
async def test_the_cli_sends_nothing_to_a_socket_or_server_of_another_user(
    tmp_path: Path,
) -> None:
    from tests.daemon_proc import cli

    theirs = tmp_path / "theirs"
    os.mkdir(theirs, 0o755)
    os.chown(theirs, NOBODY, NOBODY)
    code, _, err = await cli("agents", socket=theirs / "corral.sock")
    assert code == 3 and f"belongs to uid {NOBODY}" in err

    ours = Path(f"/tmp/corral-peer-{os.getpid()}")  # short: a socket path has a limit
    os.mkdir(ours, 0o700)
    sock = ours / "corral.sock"
    read_end, write_end = os.pipe()
    pid = serve_as(NOBODY, sock, write_end)
    try:
        assert os.read(read_end, 1) == b"x"
        code, _, err = await cli("submit", "a secret prompt", socket=sock)
        assert code == 3 and f"runs as uid {NOBODY}" in err
    finally:
        os.kill(pid, 9)
        await asyncio.to_thread(os.waitpid, pid, 0)
        os.unlink(sock)
        os.rmdir(ours)
