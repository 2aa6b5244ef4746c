#!/usr/bin/env bash
# Reproduces the perplexity table of docs/quality.md: the trained model in bf16, with experts at
# 8/4/2 bits, the shipped 4/8-bit form, and fewer experts per token.
#
# Needs the bf16 checkpoint written by scripts/train/train.py (default .carry/trained-bf16) and
# the held-out split from scripts/corpus/build_corpus.py (default .carry/corpus/heldout.txt).
# Usage: scripts/quality/measure.sh [BF16_DIR] [HELDOUT_TXT]   (TOKENS=65536 by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
BF16=${1:-.carry/trained-bf16}
HELDOUT=${2:-.carry/corpus/heldout.txt}
TOKENS=${TOKENS:-65536}
FM=target/release/flashmoe
cargo build --release -q -p flashmoe-cli
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
SHIPPED=models/qwen35-moe-tiny-trained

mkdir -p "$W/bf16"
cp "$BF16"/*.safetensors "$BF16"/config.json "$W/bf16/"
cp "$SHIPPED"/tokenizer.json "$SHIPPED"/tokenizer_config.json "$SHIPPED"/chat_template.jinja "$W/bf16/"
$FM convert "$W/bf16" "$W/e8" --expert-bits 8 --bits bf16 2>/dev/null
$FM convert "$W/bf16" "$W/e4" --expert-bits 4 --bits bf16 2>/dev/null
$FM convert "$W/bf16" "$W/e2" --expert-bits 2 --bits bf16 2>/dev/null
$FM convert "$SHIPPED" "$W/shipped-e2" --expert-bits 2 2>"$W/requant.txt"

ppl() {
  local label=$1 dir=$2
  shift 2
  local out
  out=$($FM ppl --model "$dir" --file "$HELDOUT" --max-tokens "$TOKENS" --window 512 --json "$@")
  python3 -c "import json,sys; d=json.loads(sys.argv[2]); print(f\"| {sys.argv[1]} | {d['ppl']:.3f} | {d['nll']:.4f} | {d['predictions']} |\")" "$label" "$out"
}

echo "| configuration | perplexity | NLL (nats) | predictions |"
echo "|---|---|---|---|"
ppl "bf16 (all weights)" "$W/bf16"
ppl "experts 8-bit, rest bf16" "$W/e8"
ppl "experts 4-bit, rest bf16" "$W/e4"
ppl "experts 2-bit, rest bf16" "$W/e2"
ppl "shipped: experts 4-bit, rest 8-bit" "$SHIPPED"
ppl "shipped, experts requantized 4→2-bit" "$W/shipped-e2"
ppl "bf16, K = 4 (native)" "$W/bf16" --experts 4
ppl "bf16, K = 2 (native/2)" "$W/bf16" --experts 2
ppl "bf16, K = 1" "$W/bf16" --experts 1
ppl "shipped, K = 2" "$SHIPPED" --experts 2
echo
echo "4→2-bit requantization error of the shipped experts (layer, projection, RMSE, source RMS):"
grep " experts\." "$W/requant.txt" | awk '{print "    " $1, $2, $5, $6}'
