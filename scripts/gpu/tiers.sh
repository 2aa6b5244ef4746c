#!/usr/bin/env bash
# Expert tiers on the GPU machine (issue 11): synthetic Qwen3.5-397B, first 12 of 60 layers,
# routers shaped like the measured 397B profile, O_DIRECT reads (the page cache would hide the
# disk). For each memory split (an 80 GB GPU + 128 GB RAM box scaled 12/60, and a 24 GB + 64 GB
# one), decode with:
#   inclusive  — the tiers before this change (RAM keeps a copy of what the GPU loads), cold;
#   exclusive  — one home per expert, GPU evictions copied back to RAM, cold;
#   pre-warmed — exclusive, tiers filled hottest-first from the routing profile a first run
#                of this model saved (the measured window starts when the pre-warm has ended).
# All with --hybrid auto (RAM-tier hits computed by the CPU). Then every expert on the GPU.
#   PATH=$PWD/.carry/bin:$PATH scripts/gpu/tiers.sh [MODEL] [STAGE]
# STAGE: all (default), cold (profile + cold runs), warm (profile + pre-warmed runs + resident).
# Routing traces of the profile run and the pre-warmed runs go to $OUT (for routing-stats).
set -uo pipefail
M=${1:-/tmp/m12}
STAGE=${2:-all}
P=testdata/routing/qwen3.5-397b-expert-activation-profile.json
export FLASHMOE_HOME=${FLASHMOE_HOME:-/tmp/flashmoe-home}
if [ ! -f "$M/manifest.json" ]; then
    t=$(date +%s)
    flashmoe synth --geometry qwen3.5-397b-a17b --layers 12 --routing-like $P --out "$M" >/dev/null 2>&1
    echo "synth: $(( $(date +%s) - t )) s"
fi
du -sh "$M"
B="flashmoe bench decode --model $M --device cuda --io direct --routing model --prefill 4 --disk-bw 1.4"
run() { # label, args...
    local label=$1; shift
    echo "[$label]"
    $B --tokens ${T:-64} "$@" 2>&1 | grep -E "bench decode|gpu:|tier floor|pre-warm|error|Error"
}
if [ ! -d "$FLASHMOE_HOME/routing-profiles" ] || [ "$STAGE" != warm ]; then
    # The profile: one run's routing counts, saved in FLASHMOE_HOME (auto).
    rm -rf "$FLASHMOE_HOME/routing-profiles"
    T=400 run "record profile (exclusive, cold, 400 tokens)" --gpu-cache 14G --ram-cache 24G --hybrid auto \
        --routing-profile auto --warmup 0 --seed 7 --trace-routing ${OUT:-/tmp}/trace-profile.jsonl
    ls -la "$FLASHMOE_HOME/routing-profiles"
fi
if [ "$STAGE" != cold ]; then
    prof=$(ls "$FLASHMOE_HOME"/routing-profiles/*.json | head -1)
    for split in "14G 24G" "4.8G 10G"; do
        set -- $split
        for rep in 1 2; do
            run "$1+$2 exclusive pre-warmed (#$rep)" --gpu-cache $1 --ram-cache $2 --hybrid auto --routing-profile "$prof" \
                --warmup 8 --seed $rep --trace-routing ${OUT:-/tmp}/trace-$1-$2-$rep.jsonl
        done
        [ -n "${HYBRID_OFF:-}" ] && run "$1+$2 exclusive pre-warmed, hybrid off" --gpu-cache $1 --ram-cache $2 --hybrid off \
            --routing-profile "$prof" --warmup 8
    done
    echo "[every expert on the GPU]"
    $B --tokens 128 --warmup 8 2>&1 | grep -E "bench decode|roofline"
fi
if [ "$STAGE" != warm ]; then
    for split in "14G 24G" "4.8G 10G"; do
        set -- $split
        run "$1+$2 inclusive cold" --gpu-cache $1 --ram-cache $2 --hybrid auto --tiers inclusive
        run "$1+$2 exclusive cold" --gpu-cache $1 --ram-cache $2 --hybrid auto
    done
fi
