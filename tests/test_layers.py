"""Imports only go down the layers; the CLI's client side loads none of the daemon."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "corral"

# Each layer may import only from the layers listed after it.
ORDER = [
    "cli",
    "mcp",
    "daemon",
    "ui",
    "server",
    "schedule",
    "notify",
    "retention",
    "executor",
    "workspace",
    "llm",
    "storage",
    "config",
    "render",
    "paths",
    "host",
    "models",
    "retry",
    "errors",
    "corral",  # the package itself: its version, nothing else
]
ALLOWED_SAME_LEVEL: set[tuple[str, str]] = set()


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "corral"


def corral_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("corral"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("corral"))
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        out.append((name, path))
    return out


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_imports_only_go_down(name: str, path: Path) -> None:
    mine = layer_of(name)
    if mine == "corral":
        return
    if name == "corral.server.client":
        # Only what is itself standard library only.
        assert corral_imports(path) <= {"corral.host.peercred"}, "the CLI's client imports"
        return
    for target in corral_imports(path):
        theirs = layer_of(target)
        if theirs == mine or (mine, theirs) in ALLOWED_SAME_LEVEL:
            continue
        assert ORDER.index(theirs) > ORDER.index(mine), f"{name} imports {target} (upwards)"


def test_the_mcp_server_does_not_load_the_daemon() -> None:
    code = ("import sys, corral.mcp; heavy = [m for m in ('aiohttp', 'sqlite3', 'corral.daemon',"
            " 'corral.executor', 'corral.storage', 'corral.config') if m in sys.modules];"
            " print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_client_commands_do_not_load_the_daemon() -> None:
    code = ("import sys, corral.cli; heavy = [m for m in ('aiohttp', 'sqlite3', 'pydantic',"
            " 'corral.daemon', 'corral.executor', 'corral.storage') if m in sys.modules];"
            " print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
