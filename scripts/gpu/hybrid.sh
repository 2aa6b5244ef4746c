#!/usr/bin/env bash
# Hybrid decode on the GPU machine: GPU-cache misses copied to the GPU (off), computed by the CPU
# when the RAM tier holds them (auto), or all computed by the CPU (cpu). The regime of the
# llama.cpp `-ot exps=CPU` comparison: Qwen3.5-35B-A3B geometry, 8 layers, 4-bit experts, GPU
# cache ≈ 10% of the experts, RAM tier = every expert, page-cache reads. Alternated, 2 runs each.
#   PATH=$PWD/.carry/bin:$PATH scripts/gpu/hybrid.sh [MODEL]
set -uo pipefail
M=${1:-/tmp/m35}
P=testdata/routing/qwen3.5-35b-expert-activation-profile.json
[ -f "$M/manifest.json" ] || flashmoe synth --geometry qwen3.5-35b-a3b --layers 8 --routing-like $P --out "$M" >/dev/null 2>&1
du -sh "$M"
for i in 1 2; do
    for h in off auto cpu; do
        echo "[hybrid $h]"
        flashmoe bench decode --model "$M" --device cuda --gpu-cache 340M --ram-cache 100% --io page --hybrid $h \
            --routing model --tokens 64 --prefill 4 --seed $i --disk-bw 3 2>&1 | grep -E "bench decode|gpu:"
    done
done
