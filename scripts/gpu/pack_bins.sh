#!/usr/bin/env bash
# Builds the binaries the GPU machine runs (it has no cargo) and packs them, stripped and
# compressed, into .carry/bin.tar.xz (the device tool carries at most 64 MiB with the tree).
set -euo pipefail
# Without the embedded built-in model (15 MB): the tree carried with it holds the model's folder
# (--model models/qwen35-moe-tiny-trained), and tree + binaries must stay under 64 MiB.
cargo build --release -p flashmoe-cli --no-default-features --features cuda
cargo build --release -p flashmoe-kernels --example expert_bench
ktest=$(cargo test --release -p flashmoe-kernels --no-run 2>&1 | grep -o 'target/release/deps/kernels-[0-9a-f]*' | sort -u | head -n 1)
tests=$(cargo test -p flashmoe --features cuda --no-run 2>&1 | grep -o 'target/debug/deps/\(reference\|tiers\|gguf_models\|batch\|flashmoe\)-[0-9a-f]*' | sort -u)
rm -rf .carry/bin && mkdir -p .carry/bin
strip -o .carry/bin/flashmoe target/release/flashmoe
strip -o .carry/bin/expert_bench target/release/examples/expert_bench
strip -o .carry/bin/kerneltests "$ktest"
for t in $tests; do
    case $t in
    *reference-*) strip -o .carry/bin/reference "$t" ;;
    *tiers-*) strip -o .carry/bin/tiers "$t" ;;
    *gguf_models-*) strip -o .carry/bin/ggufmodels "$t" ;;
    *batch-*) strip -o .carry/bin/batchtests "$t" ;;
    *flashmoe-*) strip -o .carry/bin/enginelib "$t" ;;
    esac
done
# gguf-py (pure Python) for the GGUF tests' reference dequantization: the GPU machine has numpy
# but no network to install it.
python3 -c 'import gguf' 2>/dev/null || bash scripts/ci_python_deps.sh
rm -rf .carry/pylib && mkdir -p .carry/pylib
cp -r "$(python3 -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')" .carry/pylib/
find .carry/pylib -name __pycache__ -prune -exec rm -rf {} +
tar cf - -C .carry/bin . | xz -9 -T1 >.carry/bin.tar.xz
ls -la .carry/bin.tar.xz
