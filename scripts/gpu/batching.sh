#!/usr/bin/env bash
# Continuous batching on the GPU machine (issue 14, part 7): the batch tests on the CPU and the
# GPU, then `bench batch` (1, 2, 4, 8 sequences decoded together) on a synthetic Qwen3.5-35B-A3B
# (8 of 40 layers, routers shaped like the measured 35B profile):
#   gpu-resident  — every expert in GPU memory;
#   gpu-streamed  — a GPU cache of 10% of the experts, the rest from the RAM tier (page cache);
#   cpu-ram       — the CPU backend on the mapped experts (all in RAM), 16 threads;
#   cpu-disk      — the CPU backend, experts read with O_DIRECT, no RAM tier.
#   PATH=$PWD/.carry/bin:$PATH scripts/gpu/batching.sh [MODEL]
set -uo pipefail
M=${1:-/tmp/s35x8}
export FLASHMOE_HOME=${FLASHMOE_HOME:-/tmp/flashmoe-home}
batchtests --test-threads 1 2>&1 | grep -E "max \|Δ\||test |test result|panicked" | head -20
if [ ! -f "$M/manifest.json" ]; then
    t=$(date +%s)
    flashmoe synth --geometry qwen3.5-35b-a3b --layers 8 \
        --routing-like testdata/routing/qwen3.5-35b-expert-activation-profile.json --out "$M" >/dev/null 2>&1
    echo "synth: $(( $(date +%s) - t )) s, $(du -sh "$M" | cut -f1)"
fi
B="flashmoe bench batch --model $M --streams ${STREAMS:-1,2,4,8} --tokens ${T:-64} --warmup 16"
run() { # label, args...
    local label=$1; shift
    echo "[$label]"
    $B "$@" 2>&1 | grep -vE "^\[flashmoe\] (model|loading)"
}
run gpu-resident --device cuda
run gpu-streamed --device cuda --gpu-cache 340M --io page --ram-cache 100%
run cpu-ram --device cpu --io mmap
T=16 run cpu-disk --device cpu --io direct
