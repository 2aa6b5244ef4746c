#!/usr/bin/env bash
# The whole test suite: the Rust tests, then the end-to-end suites that drive the built binary
# with the official `openai`/`anthropic` Python packages (server) and a real terminal (tmux, chat).
# Installs the Python packages it needs (pinned, scripts/ci_python_deps.sh) and, as root on a
# Debian machine, tmux and the English word list when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v tmux >/dev/null || need_apt+=(tmux)
[ -f /usr/share/dict/words ] || need_apt+=(wamerican)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${need_apt[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${need_apt[@]}" >/dev/null; }
  else
    echo "missing: ${need_apt[*]} (install these Debian packages)" >&2
    exit 1
  fi
fi

# Before the Rust tests: crates/engine/tests/gguf.rs runs gguf-py.
bash scripts/ci_python_deps.sh

echo "== cargo test --workspace"
cargo test --workspace

echo "== building the binary the end-to-end suites drive"
cargo build -p flashmoe-cli

echo "== server: official openai / anthropic clients"
python3 -m pytest tests/server -q -p no:cacheprovider

echo "== Hugging Face cache: flashmoe pull / --model OWNER/NAME against huggingface_hub"
python3 -m pytest tests/hub -q -p no:cacheprovider

echo "== terminal chat in tmux"
python3 tests/chat/chat_tmux_test.py
