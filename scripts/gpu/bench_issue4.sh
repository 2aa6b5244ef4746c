#!/usr/bin/env bash
# Issue 4 benchmarks on the GPU machine (binaries from scripts/gpu/pack_bins.sh on PATH):
#   scripts/gpu/bench_issue4.sh resident|stream|prefill|cpu [MODEL]
# MODEL defaults to /tmp/m12: synthetic qwen3.5-397b-a17b, first 12 layers, experts 4-bit,
# routers shaped like the measured 397B routing profile (made here if missing).
set -uo pipefail
what=${1:?resident|stream|prefill|cpu}
M=${2:-/tmp/m12}
P=testdata/routing/qwen3.5-397b-expert-activation-profile.json
if [ ! -f "$M/manifest.json" ]; then
    flashmoe synth --geometry qwen3.5-397b-a17b --layers 12 --routing-like $P --out "$M" >/dev/null 2>&1
fi
case $what in
resident) # every expert in GPU memory (preloaded); 3 separate processes
    for i in 1 2 3; do
        flashmoe bench decode --model "$M" --device cuda --routing model --tokens 128 --prefill 16 --warmup 8 --seed $i --disk-bw 3 2>&1 | grep -E "device:|bench decode|roofline"
    done ;;
stream) # a 24 GB GPU + 64 GB RAM box scaled to 12 of 60 layers: 4.8 GB GPU cache, 10 GB RAM cache
    # (12.8 GB less the 1.4 GB of non-expert weights and ~1.4 GB of process), O_DIRECT reads
    for r in model uniform; do
        flashmoe bench decode --model "$M" --device cuda --gpu-cache 4.8G --ram-cache 10G --io direct --routing $r --tokens 48 --prefill 4 --warmup 48 --repeats 2 2>&1 | grep -E "device:|disk bandwidth|bench decode|gpu:|roofline|tier floor|over"
    done ;;
prefill) # prompt processing against decode
    for n in 64 512 4096; do
        flashmoe bench decode --model "$M" --device cuda --routing model --tokens 16 --prefill $n --warmup 2 --disk-bw 3 2>&1 | grep -E "bench decode"
    done ;;
cpu) # the CPU backend on the same machine (16 cores), experts from the page cache after warm-up
    flashmoe bench decode --model "$M" --device cpu --io page --routing model --tokens 16 --prefill 4 --warmup 24 --disk-bw 3 2>&1 | grep -E "bench decode" ;;
esac
