#!/usr/bin/env bash
# Python packages for the server tests (tests/server): the official OpenAI and Anthropic SDKs
# drive `flashmoe serve` the way users' tools do. Pinned so CI runs are reproducible.
set -euo pipefail
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  "openai==3.57.0" \
  "anthropic==2.14.0" \
  "pytest==9.2.0" \
  "requests==2.34.2"
