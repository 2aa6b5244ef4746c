#!/usr/bin/env bash
# Prefill on the GPU (binaries from scripts/gpu/pack_bins.sh on PATH), every expert resident:
#   scripts/gpu/prefill.sh bench [MODEL]     tok/s at 512 and 4096 tokens, tensor and f32 alternated
#   scripts/gpu/prefill.sh profile [MODEL]   kernel time by kernel (ncu) of N-token prefills
#                                            (N=512, PRECISIONS="tensor f32" by default)
# MODEL defaults to /tmp/m35x8: synthetic qwen3.5-35b-a3b, first 8 layers (made here if missing).
set -uo pipefail
what=${1:?bench|profile}
M=${2:-/tmp/m35x8}
if [ ! -f "$M/manifest.json" ]; then
    flashmoe synth --geometry qwen3.5-35b-a3b --layers 8 --out "$M" >/dev/null 2>&1
fi
here=$(dirname "$0")
case $what in
bench)
    for n in 512 4096; do
        for rep in 1 2; do
            for p in tensor f32; do
                echo "prefill $n, $p, run $rep"
                flashmoe bench decode --model "$M" --device cuda --precision $p --routing model --tokens 16 \
                    --prefill $n --warmup 2 --disk-bw 3 2>&1 | grep -E "bench decode"
            done
        done
    done ;;
profile)
    for p in ${PRECISIONS:-tensor f32}; do
        # The bench runs one untimed prefill before the timed one: totals cover two prefills
        # (and the load's table writes and one decode step).
        ncu --csv --metrics gpu__time_duration.sum --clock-control none \
            flashmoe bench decode --model "$M" --device cuda --precision $p --routing model --tokens 1 \
            --prefill "${N:-512}" --warmup 0 --disk-bw 3 >/tmp/ncu-$p.csv 2>/tmp/ncu-$p.err
        echo "== precision $p (2 prefills of ${N:-512} tokens; us per prefill)"
        python3 "$here/ncu_summary.py" /tmp/ncu-$p.csv 2 >/tmp/ncu-$p.txt
        head -n 30 /tmp/ncu-$p.txt
    done ;;
esac
