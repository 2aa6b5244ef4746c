#!/usr/bin/env bash
# Re-measures docs/performance.md "Expert streaming (issue 3)" (4): writes the 40-layer synthetic
# qwen3.5-35b-a3b (≈ 18 GB) to DIR, then alternates fio and the expert store in both I/O modes
# for three rounds, then runs three decode benchmarks, each right after a fio direct measurement.
# Usage: scripts/bench/issue3_rounds.sh [DIR]   (needs fio; run as root for drop_caches)
set -euxo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-/tmp/flashmoe-issue3}
cargo build --release -q -p flashmoe-cli
FM=target/release/flashmoe
[ -f "$DIR/manifest.json" ] || $FM synth --geometry qwen3.5-35b-a3b \
  --routing-like testdata/routing/qwen3.5-35b-expert-activation-profile.json --out "$DIR"
F=$(ls "$DIR"/experts/*.bin | head -20 | paste -sd:)
for round in 1 2 3; do
  uptime
  MODES="direct psync 1" scripts/bench/fio_experts.sh "$F" 1769472 8 2
  $FM bench experts --model "$DIR" --tokens 8 --layers 20 --repeats 2 --io direct --io-threads 8
  MODES="buffered psync 0" scripts/bench/fio_experts.sh "$F" 1769472 8 2
  $FM bench experts --model "$DIR" --tokens 8 --layers 20 --repeats 2 --io page --io-threads 8
done
for s in 1 2 3; do
  uptime
  MODES="direct psync 1" scripts/bench/fio_experts.sh "$F" 1769472 8 2
  $FM bench decode --model "$DIR" --io direct --ram-cache 25% --routing uniform --tokens 24 --seed "$s"
done
