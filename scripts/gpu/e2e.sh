#!/usr/bin/env bash
# End-to-end on the GPU machine with the built-in model: the same greedy text on the CPU and the
# GPU, the same perplexity, and a chat request answered by the server running on the GPU.
set -uo pipefail
out=${1:-/tmp/flashmoe-e2e}
mkdir -p "$out"
export FLASHMOE_HOME=$out/home
P="How do I list the files in a Debian package?"
for d in cpu cuda; do
    flashmoe run --device $d --prompt "$P" --temperature 0 --max-tokens 48 >"$out/run-$d.txt" 2>"$out/run-$d.err"
    grep -E "device:|prompt" "$out/run-$d.err"
done
if cmp -s "$out/run-cpu.txt" "$out/run-cuda.txt"; then echo "greedy text: identical on cpu and cuda"; else
    echo "greedy text DIFFERS"; diff "$out/run-cpu.txt" "$out/run-cuda.txt" | head; fi
M=$(dirname "$(find "$out/home/models" -name manifest.json | head -n 1)")
for d in cpu cuda; do
    flashmoe ppl --model "$M" --file testdata/trained/heldout-sample.txt --device $d --json 2>/dev/null | tail -n 1
done
flashmoe serve --model "$M" --device cuda --port 18181 >"$out/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 60); do curl -s localhost:18181/v1/models >/dev/null && break; sleep 0.5; done
name=$(curl -s localhost:18181/v1/models | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
curl -s localhost:18181/v1/chat/completions -H 'content-type: application/json' \
    -d "{\"model\":\"$name\",\"messages\":[{\"role\":\"user\",\"content\":\"$P\"}],\"max_tokens\":32,\"temperature\":0}" | head -c 700; echo
kill $pid; grep -i "device" "$out/serve.log" | head -n 2
