#!/usr/bin/env bash
# Experts in host RAM (the regime of llama.cpp's `-ot exps=CPU`): hybrid decode's PCIe share and
# prefill's borrowed experts, A/B in one build, alternated, on the peer harness's checkpoint
# (scripts/gpu/decode_peer.sh prep writes it; the same flags as its gpu-ram regime: GPU cache 10%
# of the experts, RAM tier = every expert, pre-warmed, page-cache reads, 16 threads).
#   FLASHMOE_BIN=/tmp/fmbin/flashmoe scripts/gpu/pcie_share.sh [REPS]
# VARIANTS: NAME=ENV pairs; default: the PCIe share from measured rates, no PCIe share (the CPU
# computes every RAM-tier miss, as before), and that with prefill moving experts (as before).
set -uo pipefail
REPS=${1:-2}
FM=${FLASHMOE_BIN:-flashmoe}
M=${M:-/tmp/m35p/packed-4bit}
VARIANTS=${VARIANTS:-"share=FLASHMOE_PCIE_SHARE=auto cpu=FLASHMOE_PCIE_SHARE=0 before=FLASHMOE_PCIE_SHARE=0,FLASHMOE_PREFILL_BORROW=0"}
TESTS=${TESTS:-tg pp}
cache=$(python3 -c "import json,sys; m=json.load(open('$M/manifest.json')); print(sum(l['num_experts']*l['stride'] for l in m['experts'])//10>>20)")M
# Each run gets a fresh FLASHMOE_HOME (no routing profile from an earlier run) but shares the
# compiled kernels (else every process spends a minute or more in NVRTC first).
KCACHE=${KCACHE:-/tmp/flashmoe-kernel-cache}
mkdir -p "$KCACHE"
fresh_home() { local h; h=$(mktemp -d); ln -s "$KCACHE" "$h/cuda"; echo "$h"; }
short() { grep -E "bench decode|gpu:|host per token|device:" | sed -E 's/\| peak RSS.*\| io/| io/; s/^\[flashmoe\] //'; }
for i in $(seq "$REPS"); do
    for v in $VARIANTS; do
        for t in $TESTS; do
            if [ $t = tg ]; then a="--prefill 4 --tokens 64 --warmup 8"; else a="--prefill 512 --tokens 2 --warmup 0"; fi
            echo "[${v%%=*} $t, rep $i]"
            SECONDS=0; env $(echo "${v#*=}" | tr , ' ') RAYON_NUM_THREADS=16 FLASHMOE_HOME=$(fresh_home) "$FM" bench decode --model "$M" --routing model \
                $a --device cuda --gpu-cache "$cache" --ram-cache 100% --io page --hybrid auto --routing-profile auto 2>&1 | short
            echo "(process wall time ${SECONDS} s: load, pre-warm, run)"
        done
    done
done
