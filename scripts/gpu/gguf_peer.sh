#!/usr/bin/env bash
# flashmoe and llama.cpp on the same GGUF files, CPU only, on the GPU machine (16 cores), from
# binaries built here (scripts/gpu/pack_bins.sh) and the trimmed llama.cpp source
# (scripts/bench/peer/peer.py source --tarball-out .carry/llama-src.tar.xz):
#   scripts/gpu/gguf_peer.sh start   # unpack, build llama.cpp (CPU), the GGUF fixtures' llama.cpp
#                                    # logits, GPU parity
#   scripts/gpu/gguf_peer.sh bench   # unpack and build if needed, write the model (LAYERS of
#                                    # the 35B-A3B geometry), then the alternated benchmark
# (A device call's background processes end with the call, so each phase is one call.)
set -euo pipefail
export PEER_HOME=/tmp/peer FLASHMOE_BIN=/tmp/fmbin/flashmoe
P=scripts/bench/peer/peer.py
OUT=${OUT:-/tmp/gguf-peer-out}
LAYERS=${LAYERS:-8}
case "${1:-}" in
start)
    mkdir -p /tmp/fmbin && tar xJf .carry/bin.tar.xz -C /tmp/fmbin
    python3 $P source --tarball-in .carry/llama-src.tar.xz >/dev/null
    python3 $P build --jobs 16 >"$OUT/llama-build.log" 2>&1
    python3 scripts/fixtures/gguf_models.py --llama-src /tmp/peer/llama.cpp --llama-bin /tmp/peer/build-cpu/bin \
        --out /tmp/gm >"$OUT/fixtures.log" 2>&1 && cp /tmp/gm/llama-logits.json "$OUT/"
    BIN=/tmp/fmbin bash scripts/gpu/parity.sh "$OUT/parity" >"$OUT/parity.log" 2>&1 || true
    tail -n 4 "$OUT/parity.log"
    ;;
bench)
    if [ ! -x /tmp/peer/build-cpu/bin/llama-bench ]; then
        mkdir -p /tmp/fmbin && tar xJf .carry/bin.tar.xz -C /tmp/fmbin
        python3 $P source --tarball-in .carry/llama-src.tar.xz >/dev/null
        python3 $P build --jobs 16 >"$OUT/llama-build.log" 2>&1
    fi
    python3 $P model --geometry qwen3.5-35b-a3b --layers "$LAYERS" --out /tmp/m35 >"$OUT/model.log" 2>&1
    python3 $P bench --dir /tmp/m35 --regime cpu --fm-gguf --threads 16 --reps 3 --tg 64 --pp 512
    ;;
*)
    echo "usage: $0 start|bench" >&2
    exit 2
    ;;
esac
