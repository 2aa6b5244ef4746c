#!/usr/bin/env bash
# flashmoe and llama.cpp on the same GGUF files on the GPU machine (16 cores, H200), from
# binaries built here (scripts/gpu/pack_bins.sh) and the trimmed llama.cpp source
# (scripts/bench/peer/peer.py source --tarball-out .carry/llama-src.tar.xz):
#   scripts/gpu/gguf_peer.sh start     # unpack, build llama.cpp (CPU), the GGUF fixtures' llama.cpp
#                                      # logits, GPU parity
#   scripts/gpu/gguf_peer.sh bench     # unpack and build if needed, write the model (LAYERS of
#                                      # the 35B-A3B geometry), then the alternated benchmark (CPU)
#   scripts/gpu/gguf_peer.sh cpu-ab    # build and model as `bench`, then flashmoe's CPU matmul
#                                      # kernels A/B (FLASHMOE_MATMUL_KERNEL=tiles against the
#                                      # default), prefill 512 and decode, 16 threads, alternated;
#                                      # then `bench` in the next call
#   scripts/gpu/gguf_peer.sh gpu-prep  # GPU parity while llama.cpp builds (CPU and CUDA) and the
#                                      # model is written
#   scripts/gpu/gguf_peer.sh gpu-bench REGIME  # the alternated benchmark, gpu or gpu-ram
#                                      # (the next call must come within the machine's idle time)
#   scripts/gpu/gguf_peer.sh gpu-quick # one call: the GPU kernel checks and GGUF tests while the
#                                      # model is written (CPU llama.cpp build for llama-quantize),
#                                      # then flashmoe alone on the GPU (packed, Q4_0, Q4_K_M:
#                                      # decode and prefill, 2 alternated runs) and a --timing run
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
cpu-ab)
    mkdir -p "$OUT" /tmp/fmbin && tar xJf .carry/bin.tar.xz -C /tmp/fmbin
    if [ ! -x /tmp/peer/build-cpu/bin/llama-bench ]; then
        python3 $P source --tarball-in .carry/llama-src.tar.xz >/dev/null
        python3 $P build --jobs 16 >"$OUT/llama-build.log" 2>&1
    fi
    python3 $P model --geometry qwen3.5-35b-a3b --layers "$LAYERS" --out /tmp/m35 >"$OUT/model.log" 2>&1
    for rep in $(seq "${REPS:-3}"); do
        for m in packed-4bit model-Q4_K_M.gguf; do
            for k in tiles auto; do
                printf '%s %s %s: ' "$rep" "$m" "$k"
                FLASHMOE_MATMUL_KERNEL=$k RAYON_NUM_THREADS=16 $FLASHMOE_BIN bench decode --model "/tmp/m35/$m" \
                    --routing model --prefill 512 --tokens 32 --warmup 4 --device cpu --io mmap 2>&1 |
                    grep -o 'prefill 512 tok in [^|]*| decode [0-9.]* tok/s' || echo failed
            done
        done
    done
    ;;
gpu-prep)
    mkdir -p "$OUT" /tmp/fmbin && tar xJf .carry/bin.tar.xz -C /tmp/fmbin
    python3 $P source --tarball-in .carry/llama-src.tar.xz >/dev/null
    (python3 $P build --cuda --jobs 16 >"$OUT/llama-build-cuda.log" 2>&1; echo "cuda build rc $?") &
    (python3 $P build --jobs 16 >"$OUT/llama-build.log" 2>&1 &&
        python3 $P model --geometry qwen3.5-35b-a3b --layers "$LAYERS" --out /tmp/m35 >"$OUT/model.log" 2>&1
        echo "model rc $?") &
    BIN=/tmp/fmbin bash scripts/gpu/parity.sh "$OUT/parity" >"$OUT/parity.log" 2>&1 || true
    tail -n 70 "$OUT/parity.log"
    wait
    ;;
gpu-bench)
    python3 $P bench --dir /tmp/m35 --regime "${2:-gpu}" --fm-gguf --threads 16 --reps "${REPS:-2}" --tg 64 --pp 512
    ;;
gpu-quick)
    mkdir -p "$OUT" /tmp/fmbin && tar xJf .carry/bin.tar.xz -C /tmp/fmbin
    python3 $P source --tarball-in .carry/llama-src.tar.xz >/dev/null
    (python3 $P build --jobs 12 >"$OUT/llama-build.log" 2>&1 &&
        python3 $P model --geometry qwen3.5-35b-a3b --layers "$LAYERS" --out /tmp/m35 >"$OUT/model.log" 2>&1
        echo "model rc $?") &
    /tmp/fmbin/flashmoe selftest --device cuda --quiet >"$OUT/selftest.txt" 2>&1; echo "selftest rc $?"
    grep -E "ggml|q4_0|Q4_0|Q6_K|summary|checks|FAIL" "$OUT/selftest.txt" | head -n 60
    PYTHONPATH=$PWD/.carry/pylib FLASHMOE_TESTDATA=$PWD/testdata /tmp/fmbin/ggufmodels --test-threads 1 --nocapture \
        >"$OUT/ggufmodels.txt" 2>&1; echo "ggufmodels rc $?"
    grep -E " on |result|panicked" "$OUT/ggufmodels.txt"
    wait
    for rep in 1 2; do
        for m in packed-4bit model-Q4_0.gguf model-Q4_K_M.gguf; do
            for t in "--prefill 4 --tokens 64 --warmup 8" "--prefill 512 --tokens 2 --warmup 0"; do
                echo "rep $rep $m $t: $(/tmp/fmbin/flashmoe bench decode --model /tmp/m35/$m --routing model $t \
                    --device cuda --io page 2>&1 | grep -o 'prefill [0-9]* tok in.*')"
            done
        done
    done
    for m in packed-4bit model-Q4_0.gguf; do
        /tmp/fmbin/flashmoe run --model /tmp/m35/$m --device cuda --timing --temperature 0 --max-tokens 24 -p "Hello there" \
            >"$OUT/timing-$m.txt" 2>&1
        tail -n 25 "$OUT/timing-$m.txt"
    done
    ;;
*)
    echo "usage: $0 start|bench|gpu-prep|gpu-bench [gpu|gpu-ram]|gpu-quick" >&2
    exit 2
    ;;
esac
