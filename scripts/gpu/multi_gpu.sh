#!/usr/bin/env bash
# Several GPUs on one host (issue 16), on nvidia-h200-x2: a synthetic Qwen3.5-397B slice of the
# first 24 of 60 layers (≈ 81 GiB of 4-bit experts, routers shaped like the measured 397B
# profile), decoded with `bench decode --routing model` from the page cache:
#   resident  — every expert on the GPU: one GPU (it fits a whole H200) against the layers split
#               over two (the hand-off's cost), alternated REPS times;
#   capped    — --gpu-cache 60G: one GPU holds 60 of 81 GiB (misses cross PCIe every token), two
#               hold everything (30 + 30 of their layers' 40.5 each);
#   tiers     — --gpu-cache 16G: one GPU against two at the same size per GPU (twice the cache).
#   handoff   — the split's hand-off device to device (peer copy, the default) against through
#               pinned host memory (FLASHMOE_SPLIT_HANDOFF=host), decode and a 4096-token prefill,
#               and one GPU's prefill.
#   PATH=$PWD/.carry/bin:$PATH scripts/gpu/multi_gpu.sh [MODEL] [STAGE: all|resident|capped|tiers|handoff]
set -uo pipefail
M=${1:-/tmp/m24}
STAGE=${2:-all}
P=testdata/routing/qwen3.5-397b-expert-activation-profile.json
export FLASHMOE_HOME=${FLASHMOE_HOME:-/tmp/flashmoe-home}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
if [ ! -f "$M/manifest.json" ]; then
    t=$(date +%s)
    flashmoe synth --geometry qwen3.5-397b-a17b --layers ${LAYERS:-24} --routing-like $P --out "$M" >/dev/null 2>&1 || echo "synth failed"
    echo "synth: $(( $(date +%s) - t )) s"
fi
du -sh "$M"
B="flashmoe bench decode --model $M --io page --routing model --prefill 16 --routing-profile off"
run() { # label, args...
    local label=$1; shift
    echo "[$label]"
    local t=$(date +%s)
    timeout ${RUN_LIMIT:-150} $B "$@" 2>&1 | grep -E "bench decode|gpu|decode step|roofline|error|Error|split"
    echo "  ($(( $(date +%s) - t )) s with load)"
}
if [ "$STAGE" = all ] || [ "$STAGE" = resident ]; then
    for rep in $(seq 1 ${REPS:-2}); do
        run "resident, 1 GPU (#$rep)" --device cuda:0 --tokens 128 --warmup 8 --seed $rep
        run "resident, layers split over 2 GPUs (#$rep)" --device cuda:0,1 --tokens 128 --warmup 8 --seed $rep
    done
fi
if [ "$STAGE" = all ] || [ "$STAGE" = capped ]; then
    run "--gpu-cache 60G, 1 GPU" --device cuda:0 --gpu-cache 60G --tokens 64 --warmup 16
    run "--gpu-cache 60G per GPU, 2 GPUs" --device cuda:0,1 --gpu-cache 60G --tokens 128 --warmup 8
fi
if [ "$STAGE" = all ] || [ "$STAGE" = tiers ]; then
    run "--gpu-cache 16G, 1 GPU" --device cuda:0 --gpu-cache 16G --tokens 64 --warmup 32
    run "--gpu-cache 16G per GPU, 2 GPUs" --device cuda:0,1 --gpu-cache 16G --tokens 64 --warmup 32
fi
if [ "$STAGE" = handoff ]; then
    for rep in $(seq 1 ${REPS:-2}); do
        run "split, peer hand-off (#$rep)" --device cuda:0,1 --tokens 128 --warmup 8 --seed $rep
        FLASHMOE_SPLIT_HANDOFF=host run "split, host hand-off (#$rep)" --device cuda:0,1 --tokens 128 --warmup 8 --seed $rep
    done
    P4K="flashmoe bench decode --model $M --io page --routing model --routing-profile off --prefill 4096 --tokens 8 --warmup 2"
    for d in cuda:0 cuda:0,1; do
        echo "[$d prefill 4096]"
        timeout ${RUN_LIMIT:-150} $P4K --device $d 2>&1 | grep -E "bench decode|error|Error"
    done
    echo "[cuda:0,1 prefill 4096, host hand-off]"
    FLASHMOE_SPLIT_HANDOFF=host timeout ${RUN_LIMIT:-150} $P4K --device cuda:0,1 2>&1 | grep -E "bench decode|error|Error"
fi
