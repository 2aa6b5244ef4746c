#!/usr/bin/env bash
# The device tool copies the working tree (tracked files included) and refuses more than 64 MiB.
# With both shipped models (2 × 14.8 MB of weights) and the packed binaries the tree is over that,
# so for a device run that does not need the models' weights, move them aside and back:
#   scripts/gpu/slim_tree.sh out    # before the run
#   scripts/gpu/slim_tree.sh in     # right after it (git status must show nothing deleted)
# A run that needs a model's weights carries them another way (e.g. --model with a synth folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
aside=${FLASHMOE_SLIM_DIR:-/tmp/flashmoe-slim}
files=(models/qwen35-moe-tiny-trained/model.safetensors models/qwen35-moe-tiny-chat/model.safetensors)
case "${1:-}" in
out)
    mkdir -p "$aside"
    for f in "${files[@]}"; do
        [ -f "$f" ] && mkdir -p "$aside/$(dirname "$f")" && mv "$f" "$aside/$f"
    done
    ;;
in)
    for f in "${files[@]}"; do
        [ -f "$aside/$f" ] && mv "$aside/$f" "$f"
    done
    git status --short -- models
    ;;
*)
    echo "usage: $0 out|in" >&2
    exit 2
    ;;
esac
