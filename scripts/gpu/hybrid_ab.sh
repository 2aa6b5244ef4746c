#!/usr/bin/env bash
# Hybrid decode (experts in host RAM, the regime of llama.cpp's `-ot exps=CPU`), variants of one
# build alternated by environment: Qwen3.5-35B-A3B geometry, 8 layers, GPU cache 340M (≈ 10% of
# the experts), RAM tier = every expert (pre-warmed at load: `--routing-profile auto` with no saved
# profile loads them all, as the llama.cpp side-by-side does), page-cache reads, routers shaped
# like the 35B profile.
#   PATH=$PWD/.carry/bin:$PATH scripts/gpu/hybrid_ab.sh [REPS] [HYBRID MODES]
# VARIANTS: space-separated NAME=ENV pairs (default: stretch graphs on and off).
set -uo pipefail
REPS=${1:-2}
MODES=${2:-auto cpu}
VARIANTS=${VARIANTS:-"stretch=FLASHMOE_CUDA_STRETCHES=1 eager=FLASHMOE_CUDA_STRETCHES=0"}
P=testdata/routing/qwen3.5-35b-expert-activation-profile.json
M=${M:-/tmp/m35h}
[ -f $M/manifest.json ] || flashmoe synth --geometry qwen3.5-35b-a3b --layers 8 --routing-like $P --out $M --quiet >/dev/null 2>&1
short() { grep -E "bench decode|gpu:|host per token" | sed -E 's/\| peak RSS.*\| io/| io/; s/^\[flashmoe\] //'; }
for i in $(seq "$REPS"); do
    for h in $MODES; do
        for v in $VARIANTS; do
            echo "[${v%%=*} hybrid $h, rep $i]"
            env "${v#*=}" FLASHMOE_HOME=$(mktemp -d) flashmoe bench decode --model $M --device cuda --gpu-cache 340M --ram-cache 100% --io page \
                --hybrid "$h" --routing-profile auto --routing model --tokens 64 --warmup 200 --prefill 4 --disk-bw 3 --seed "$i" 2>&1 | short
        done
    done
done
