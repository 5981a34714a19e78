#!/usr/bin/env bash
# Installs the peers the benchmarks compare against that do not fit corral's own venv:
# mini-swe-agent (bench.agent) pins litellm and many more, so it gets a venv of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/versions.env
bash scripts/setup.sh
.venv/bin/python -m pip --disable-pip-version-check -q install -e '.[bench]'
venv=.peers/venvs/mini-swe-agent
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import minisweagent" 2>/dev/null; then
  printf '\033[1m==> installing mini-swe-agent %s into %s\033[0m\n' "$MINI_SWE_AGENT_VERSION" "$venv" >&2
  .venv/bin/python -m venv "$venv"
  "$venv/bin/python" -m pip --disable-pip-version-check -q install "mini-swe-agent==$MINI_SWE_AGENT_VERSION"
fi
