#!/usr/bin/env bash
# Python packages of the test suite, pinned so CI runs are reproducible: the official OpenAI and
# Anthropic SDKs drive `flashmoe serve` the way users' tools do (tests/server); huggingface_hub
# reads the cache `flashmoe pull` writes and writes the one flashmoe reads (tests/hub); gguf-py
# (with numpy) writes the GGUF tokenizer fixture of crates/engine/tests/gguf.rs; jsonschema
# validates the server's constrained JSON and tool-call arguments (tests/server/test_structured.py);
# tokenizers (the HF library) counts the plain-text tokens of forged special tokens (test_hardening.py);
# jinja2 renders the real Qwen3 template as transformers does (crates/text/tests/bounded.rs).
set -euo pipefail
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  "openai==3.57.0" \
  "anthropic==2.14.0" \
  "pytest==9.2.0" \
  "requests==2.34.2" \
  "huggingface_hub==2.4.0" \
  "gguf==0.19.0" \
  "numpy==2.4.6" \
  "jsonschema==4.26.0" \
  "tokenizers==0.23.3" \
  "jinja2==3.1.6"
