"""The built wheel runs outside the checkout: migrations and all, from ``cwd=/``."""

from __future__ import annotations

import asyncio
import json
import os
import site
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import until
from tests.fakes.base import Reply
from tests.fakes.openai import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
MakeFake = Callable[[], Awaitable[FakeOpenAI]]


def build_wheel(out: Path) -> Path:
    src = out / "src-copy"
    # A copy of the tracked sources: the wheel must not pick up anything the checkout has
    # lying around (an editable install's metadata, build leftovers).
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            target.write_bytes((ROOT / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out / "dist"), str(src)], check=True)
    return next((out / "dist").glob("corral-*.whl"))


def fresh_venv(where: Path, wheel: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    # The dependencies come from the test's own environment; corral itself only from the
    # wheel (a .pth line adds a folder without running the editable install's hooks in it).
    purelib = subprocess.run([str(python), "-c", "import sysconfig;"
                              " print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "deps-from-tests.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


@pytest.mark.slow
async def test_the_wheel_serves_a_task_from_the_root_folder(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    wheel = await asyncio.to_thread(build_wheel, tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        assert "corral/storage/sql/sqlite/0001_tasks_executions.sql" in archive.namelist()
    python = await asyncio.to_thread(fresh_venv, tmp_path / "venv", wheel)
    where = await asyncio.to_thread(
        subprocess.run, [str(python), "-c", "import corral; print(corral.__file__)"],
        cwd="/", check=True, capture_output=True, text=True)
    assert where.stdout.startswith(str(tmp_path / "venv"))

    fake = await fake_openai()
    fake.default = Reply(text="served from a wheel")
    sock = Path(tempfile.mkdtemp(prefix="corral-w")) / "corral.sock"
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nsocket_path = "{sock}"\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[local_model]\nendpoint = "{fake.endpoint}"\nmodel = "m"\n'
                      "[claude]\nenabled = false\n[gemini]\nenabled = false\n")
    corral = str(python.parent / "corral")
    env = {**os.environ, "CORRAL_SOCKET": str(sock)}
    daemon = await asyncio.create_subprocess_exec(
        corral, "serve", "--config", str(config), cwd="/", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async def up() -> bool:
            assert daemon.returncode is None, await daemon.stderr.read()  # type: ignore[union-attr]
            return sock.exists()

        await until(up, timeout_s=30)
        submit = await asyncio.create_subprocess_exec(
            corral, "submit", "hello", "--agent", "local", "--wait", "--json", cwd="/",
            env=env, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(submit.communicate(), 60)
        task = json.loads(out)
        assert task["state"] == "succeeded"
        assert task["executions"][0]["summary"] == "served from a wheel"
    finally:
        if daemon.returncode is None:
            daemon.terminate()
        await daemon.wait()
