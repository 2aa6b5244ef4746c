#!/usr/bin/env bash
# Resident decode on the GPU (binaries from scripts/gpu/pack_bins.sh on PATH):
#   scripts/gpu/decode_profile.sh bench [LAYERS]     tok/s, graphs on and off (2 runs each)
#   scripts/gpu/decode_profile.sh profile [LAYERS]   kernel time by kernel (ncu) per decode step
# The model: synthetic qwen3.5-35b-a3b with LAYERS layers (default 8), made in /tmp if missing.
set -uo pipefail
what=${1:?bench|profile}
L=${2:-8}
M=/tmp/m35x$L
if [ ! -f "$M/manifest.json" ]; then
    flashmoe synth --geometry qwen3.5-35b-a3b --layers "$L" --out "$M" >/dev/null 2>&1
fi
here=$(dirname "$0")
case $what in
bench)
    for rep in 1 2; do
        for graphs in 1 0; do
            echo "== $L layers, graphs $graphs, run $rep"
            FLASHMOE_CUDA_GRAPHS=$graphs flashmoe bench decode --model "$M" --device cuda --routing model \
                --tokens 128 --prefill 16 --warmup 8 --seed $rep --disk-bw 3 2>&1 | grep -E "bench decode|roofline"
        done
    done ;;
profile)
    # Prefill 1 token, no warm-up, 16 timed steps: 17 decode-shaped passes (and the load's copies).
    # Caches are not flushed between kernels (--cache-control none): in a replayed step a kernel
    # finds what the previous one left in L2, as it does here.
    ncu --csv --metrics gpu__time_duration.sum --clock-control none --cache-control none \
        flashmoe bench decode --model "$M" --device cuda --routing model --tokens 16 --prefill 1 --warmup 0 \
        --disk-bw 3 >/tmp/ncu-decode.csv 2>/tmp/ncu-decode.err
    echo "== $L layers: kernel time per decode step (17 steps)"
    python3 "$here/ncu_summary.py" /tmp/ncu-decode.csv 17 | head -n 40 ;;
esac
