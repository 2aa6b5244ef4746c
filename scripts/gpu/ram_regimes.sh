#!/usr/bin/env bash
# Experts in host RAM (issue 11), variants alternated on the same models:
#   base   `flashmoe-base`, the build before (packed beside this one, when present);
#   new    this build.
# Regimes:
#   1. CPU only, all cores: 4 layers of Qwen3.5-35B-A3B (vocab 4096), RAM tier holding every
#      expert (pre-warmed at load: `--routing-profile auto` with no profile loads all); and
#      this build on the mapped files (`--io mmap`, no RAM tier), with the per-layer times;
#   2. hybrid: 8 layers, GPU cache 340M (≈ 10% of the experts), RAM tier = every expert,
#      `--hybrid auto|cpu` (the regime of llama.cpp's `-ot exps=CPU`).
#   PATH=$PWD/.carry/bin:$PATH scripts/gpu/ram_regimes.sh [REPS]
set -uo pipefail
REPS=${1:-2}
P=testdata/routing/qwen3.5-35b-expert-activation-profile.json
M4=/tmp/m35v M8=/tmp/m35h
[ -f $M4/manifest.json ] || flashmoe synth --geometry qwen3.5-35b-a3b --layers 4 --vocab 4096 --routing-like $P --out $M4 --quiet >/dev/null 2>&1
[ -f $M8/manifest.json ] || flashmoe synth --geometry qwen3.5-35b-a3b --layers 8 --routing-like $P --out $M8 --quiet >/dev/null 2>&1
VARIANTS="new"
command -v flashmoe-base >/dev/null && VARIANTS="base new"
fm() {
    local v=$1
    shift
    case $v in
    base) flashmoe-base "$@" ;;
    new) flashmoe "$@" ;;
    esac
}
short() { grep -E "bench decode|roofline|gpu:|host per token" | sed -E 's/\| peak RSS.*\| io/| io/; s/^\[flashmoe\] //'; }
for i in $(seq "$REPS"); do
    for v in $VARIANTS; do
        echo "[$v cpu, RAM tier, rep $i]"
        FLASHMOE_HOME=/tmp/fmh-$v-$i fm $v bench decode --model $M4 --device cpu --io page --ram-cache 100% \
            --routing-profile auto --routing model --tokens 64 --warmup 16 --disk-bw 3 2>&1 | short
    done
    # (The build before may predate --io mmap in bench decode and --timing: this build only.)
    for v in new; do
        echo "[$v cpu, mmap, rep $i]"
        fm $v bench decode --model $M4 --device cpu --io mmap --routing model --tokens 64 --warmup 32 --disk-bw 3 \
            $([ "$i" = 1 ] && echo --timing) 2>&1 | grep -v "^\[flashmoe\] \(experts\|device\|floor\)" | sed -E 's/\| peak RSS.*\| io/| io/'
    done
done
for i in $(seq "$REPS"); do
    for h in auto cpu; do
        for v in $VARIANTS; do
            echo "[$v hybrid $h, rep $i]"
            fm $v bench decode --model $M8 --device cuda --gpu-cache 340M --ram-cache 100% --io page --hybrid $h \
                --routing model --tokens 64 --warmup 200 --prefill 4 --disk-bw 3 --seed $i 2>&1 | short
        done
    done
done
