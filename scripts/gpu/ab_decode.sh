#!/usr/bin/env bash
# A/B resident decode, alternated, on synthetic qwen3.5-35b-a3b with LAYERS layers (made in /tmp):
#   scripts/gpu/ab_decode.sh LAYERS "NAME=COMMAND PREFIX" ...
# e.g. scripts/gpu/ab_decode.sh 8 "base=flashmoe-base" "pdl-off=env FLASHMOE_CUDA_PDL=0 flashmoe" "new=flashmoe"
L=${1:?layers}; shift
M=/tmp/m35x$L
[ -f $M/manifest.json ] || flashmoe synth --geometry qwen3.5-35b-a3b --layers $L --out $M >/dev/null 2>&1
for rep in 1 2; do
    for v in "$@"; do
        name=${v%%=*}
        cmd=${v#*=}
        echo "== $name, $L layers, run $rep"
        $cmd bench decode --model $M --device cuda --routing model --tokens 128 --prefill 16 --warmup 8 --seed $rep \
            --disk-bw 3 2>&1 | grep -E "bench decode|roofline|decode step" | sed -e 's/| peak RSS.*//'
    done
done
