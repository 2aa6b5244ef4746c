#!/usr/bin/env bash
# Python packages for the end-to-end tests: the official OpenAI and Anthropic SDKs drive
# `flashmoe serve` the way users' tools do (tests/server); huggingface_hub reads the cache
# `flashmoe pull` writes and writes the one flashmoe reads (tests/hub). Pinned so CI runs are
# reproducible.
set -euo pipefail
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  "openai==3.57.0" \
  "anthropic==2.14.0" \
  "pytest==9.2.0" \
  "requests==2.34.2" \
  "huggingface_hub==2.4.0"
