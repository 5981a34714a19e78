#!/usr/bin/env bash
# Installs what the tests need (the real claude and gemini CLIs, llama.cpp and SmolLM2) and runs
# every check: ruff, mypy (strict, src and tests) and the whole pytest suite, real peers included.
# Extra arguments go to pytest (e.g. -m "not real" for the fast tests alone).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "==> ruff" >&2
.venv/bin/ruff check src tests bench
echo "==> mypy" >&2
.venv/bin/mypy
echo "==> pytest" >&2
.venv/bin/pytest "$@"
