#!/usr/bin/env bash
# Resident GPU decode and prefill against llama.cpp (-ngl 99), same model, same run, on the GPU
# machine, in two calls (the second within the machine's idle time):
#   scripts/gpu/decode_peer.sh prep    # unpack binaries and llama.cpp, build llama.cpp (CUDA and
#                                      # CPU) and write the model (LAYERS of the 35B-A3B geometry)
#   scripts/gpu/decode_peer.sh bench   # both engines alternated (REPS), Q4_0 against packed 4-bit,
#                                      # in each of REGIMES (gpu; gpu2 splits over two GPUs)
set -euo pipefail
export PEER_HOME=/tmp/peer FLASHMOE_BIN=/tmp/fmbin/flashmoe
P=scripts/bench/peer/peer.py
LAYERS=${LAYERS:-4}
case "${1:-}" in
prep)
    mkdir -p /tmp/fmbin && tar xJf .carry/bin.tar.xz -C /tmp/fmbin
    python3 $P source --tarball-in .carry/llama-src.tar.xz >/dev/null
    (python3 $P build --cuda --jobs 16 >/tmp/llama-build-cuda.log 2>&1; echo "cuda build rc $?") &
    (python3 $P build --jobs 16 >/tmp/llama-build.log 2>&1 &&
        python3 $P model --geometry qwen3.5-35b-a3b --layers "$LAYERS" --out /tmp/m35p >/tmp/model.log 2>&1
        echo "model rc $?") &
    wait
    ;;
bench)
    # REGIMES: gpu (one GPU), gpu2 (the layers split over GPUs 0 and 1: nvidia-h200-x2).
    for r in ${REGIMES:-gpu}; do
        python3 $P bench --dir /tmp/m35p --regime "$r" --quants Q4_0 --threads 16 --reps "${REPS:-3}" --tg 64 --pp 512
    done
    ;;
esac
