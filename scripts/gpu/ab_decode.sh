#!/usr/bin/env bash
# A/B resident decode: flashmoe-base vs flashmoe, alternated.
L=${1:-8}; M=/tmp/m35x$L
[ -f $M/manifest.json ] || flashmoe synth --geometry qwen3.5-35b-a3b --layers $L --out $M >/dev/null 2>&1
for rep in 1 2; do for b in flashmoe-base flashmoe; do
  echo "== $b $L layers run $rep"
  $b bench decode --model $M --device cuda --routing model --tokens 128 --prefill 16 --warmup 8 --seed $rep --disk-bw 3 2>&1 | grep -E "bench decode|roofline|decode step" | sed -e 's/| peak RSS.*//'
done; done
