#!/usr/bin/env bash
# The one-layer-graph refactor checked on the GPU machine in one call: parity (selftest, the
# reference tests on every backend, the engine's unit tests), the end-to-end script, then the
# GPU figures of docs/performance.md with this build (`flashmoe`) and the build before the
# refactor (`flashmoe-base`, packed beside it) alternated on the same synthetic model, and the
# hooks (--timing, --trace-routing, --prefetch) on the GPU.
#   tar xJf .carry/bin.tar.xz -C .carry/bin; PATH=$PWD/.carry/bin:$PATH scripts/gpu/ab_check.sh OUT [1|2]
# Part 1: parity, end-to-end, resident decode; part 2: prefill, streaming, hooks (each fits one
# 10-minute device call; part 2 reuses part 1's synthetic model while the machine is warm).
set -uo pipefail
OUT=${1:-/tmp/ab}
PART=${2:-all}
mkdir -p "$OUT"
M=/tmp/m12
P=testdata/routing/qwen3.5-397b-expert-activation-profile.json
step() { echo; echo "== $* ($(date +%T))"; }

if [ "$PART" != 2 ]; then
step parity
BIN=.carry/bin bash scripts/gpu/parity.sh "$OUT/parity" 2>&1 | tail -n 60

step end-to-end
bash scripts/gpu/e2e.sh "$OUT/e2e" 2>&1 | tail -n 20
fi

step synth
[ -f "$M/manifest.json" ] || flashmoe synth --geometry qwen3.5-397b-a17b --layers 12 --routing-like $P --out "$M" >/dev/null 2>&1
du -sh "$M"

if [ "$PART" != 2 ]; then
step "resident decode, alternated (new, base) x3"
for i in 1 2 3; do
    for b in flashmoe flashmoe-base; do
        echo "[$b]"; $b bench decode --model "$M" --device cuda --routing model --tokens 128 --prefill 16 --warmup 8 --seed $i --disk-bw 3 2>&1 | grep -E "bench decode|roofline"
    done
done

fi
[ "$PART" = 1 ] && exit 0

step "prefill 512 / 4096, alternated"
for n in 512 4096; do
    for b in flashmoe flashmoe-base flashmoe flashmoe-base; do
        echo "[$b]"; $b bench decode --model "$M" --device cuda --routing model --tokens 8 --prefill $n --warmup 2 --disk-bw 3 2>&1 | grep -E "bench decode"
    done
done

step "streaming: 4.8G GPU cache, 10G RAM cache, O_DIRECT, alternated"
for b in flashmoe flashmoe-base flashmoe flashmoe-base; do
    echo "[$b]"; $b bench decode --model "$M" --device cuda --gpu-cache 4.8G --ram-cache 10G --io direct --routing model --tokens 32 --prefill 4 --warmup 32 2>&1 | grep -E "bench decode|gpu:"
done

step "hooks on the GPU: --timing --trace-routing --prefetch (streaming, 4.8G cache)"
flashmoe run --model "$M" --device cuda --gpu-cache 4.8G --io direct --raw --prompt "hello world" --max-tokens 8 --temperature 0 \
    --timing --trace-routing "$OUT/trace.jsonl" --prefetch 2>&1 | grep -vE "^\s*$" | tail -n 30
flashmoe routing-stats "$OUT/trace.jsonl" 2>&1 | head -n 8
echo "done $(date +%T)"
