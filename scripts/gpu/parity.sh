#!/usr/bin/env bash
# GPU parity, run on the GPU machine from binaries built elsewhere (cargo is not needed there):
#   cargo build --release -p flashmoe-cli --features cuda
#   cargo test -p flashmoe --features cuda --no-run      # the `reference` and lib test binaries
#   strip them into BIN (default .carry/bin), then: scripts/gpu/parity.sh [OUT]
# 1. every GPU kernel against the CPU kernels on random inputs (flashmoe selftest);
# 2. the full forward pass against the transformers fixtures on every backend (cpu, cuda with
#    every expert cached, cuda with a k+1-expert cache and 4-token prefill chunks);
# 3. GGUF block types (Q8_0, Q4_K_M made by llama.cpp) against gguf-py's dequantization of the
#    same files and against llama.cpp's logits, on every backend (gguf-py from .carry/pylib);
# 4. the engine's unit tests with the GPU present.
set -uo pipefail
BIN=${BIN:-.carry/bin}
OUT=${1:-${OUT:-/tmp/flashmoe-parity}}
mkdir -p "$OUT"
status=0
"$BIN/flashmoe" devices 2>&1 | tee "$OUT/devices.txt"
"$BIN/flashmoe" selftest --device cuda --quiet >"$OUT/selftest.txt" 2>&1 || status=1
tail -n 45 "$OUT/selftest.txt"
FLASHMOE_TESTDATA=$PWD/testdata "$BIN/reference" --test-threads 1 --nocapture >"$OUT/reference.txt" 2>&1 || status=1
grep -E "backend|vs|test |result|panicked|error" "$OUT/reference.txt" | head -n 120
FLASHMOE_TESTDATA=$PWD/testdata "$BIN/tiers" --test-threads 1 --nocapture >"$OUT/tiers.txt" 2>&1 || status=1
grep -E "test |result|panicked|Off:|Auto:" "$OUT/tiers.txt"
PYTHONPATH=$PWD/.carry/pylib${PYTHONPATH:+:$PYTHONPATH} FLASHMOE_TESTDATA=$PWD/testdata "$BIN/ggufmodels" --test-threads 1 \
    --nocapture >"$OUT/ggufmodels.txt" 2>&1 || status=1
grep -E " on |test |result|panicked" "$OUT/ggufmodels.txt"
"$BIN/enginelib" --test-threads 2 >"$OUT/enginelib.txt" 2>&1 || status=1
tail -n 5 "$OUT/enginelib.txt"
echo "parity status: $status"
exit $status
