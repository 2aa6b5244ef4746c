#!/usr/bin/env bash
# CPU decode against the memory roofline on the GPU machine's host cores: the Qwen3.5-35B-A3B
# geometry (4 layers, 4-bit, a 4096-token vocabulary so that the layers, not the lm_head,
# dominate), experts computed on the mapped files (`--io mmap`), at 1..N threads, with the
# per-layer breakdown; then the expert kernel alone (expert_bench) at the same thread counts.
#   PATH=$PWD/.carry/bin:$PATH scripts/gpu/cpu_scaling.sh [MODEL] [THREADS...]
set -uo pipefail
M=${1:-/tmp/m35v}
shift || true
THREADS=${*:-1 4 8 16}
P=testdata/routing/qwen3.5-35b-expert-activation-profile.json
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA|L3|Flags" | sed 's/Flags:.*\(avx512[a-z_0-9]*\).*/Flags: ... avx512 present/'
grep -o -w -E "avx512f|avx512_vnni|avx512_bf16|avx_vnni|amx_bf16|avx512bw" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
[ -f "$M/manifest.json" ] || flashmoe synth --geometry qwen3.5-35b-a3b --layers 4 --vocab 4096 --routing-like $P --out "$M" --quiet >/dev/null 2>&1
cat "$M"/experts/* "$M"/weights.bin >/dev/null
for t in $THREADS; do
    echo "[cpu decode, $t threads]"
    flashmoe bench decode --model "$M" --device cpu --io mmap --routing model --tokens 64 --warmup 32 \
        --threads "$t" --timing --disk-bw 3 2>&1 | grep -v "^\[flashmoe\] \(experts\|device\)"
done
if command -v expert_bench >/dev/null; then
    expert_bench --reps 100 --threads "$(echo $THREADS | tr ' ' ',')" 2>&1 | grep -E "threads|decode layer|matvec in_qkv|shared"
fi
