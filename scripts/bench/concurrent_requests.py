#!/usr/bin/env python3
"""Concurrent requests against a running `flashmoe serve` (continuous batching, issue 14): for
each concurrency N, N clients (the official `openai` package, streaming) send the same number of
chat requests at once, `--rounds` times; prints aggregate completion tok/s, per-request latency
(time to the last token) and time to the first token, median over all requests of that N.

    flashmoe serve --max-batch 8 --port 8123 &
    python3 scripts/bench/concurrent_requests.py --url http://127.0.0.1:8123 --streams 1,2,4,8
"""

import argparse
import statistics
import threading
import time

import openai

PROMPTS = [
    "What is a package manager?",
    "Tell me about the history of Unix.",
    "How do I list the files in a Debian package?",
    "What does the GNU project do?",
    "Explain what a shell is.",
    "What is free software?",
    "How are Debian packages built?",
    "What is a file system?",
]


def one(client, model, prompt, max_tokens, out):
    t0 = time.perf_counter()
    first = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    out.append((time.perf_counter() - t0, first or 0.0, tokens))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = a.model or client.models.list().data[0].id
    one(client, model, PROMPTS[0], 8, [])  # warm-up
    print(f"{'streams':>7}  {'aggregate tok/s':>15}  {'latency s (median)':>18}  {'first token s':>13}  {'tokens':>6}")
    base = None
    for n in [int(x) for x in a.streams.split(",")]:
        results = []
        wall = 0.0
        for _ in range(a.rounds):
            out = []
            threads = [
                threading.Thread(target=one, args=(client, model, PROMPTS[i % len(PROMPTS)], a.max_tokens, out))
                for i in range(n)
            ]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall += time.perf_counter() - t0
            results += out
        tokens = sum(r[2] for r in results)
        agg = tokens / wall
        base = base or agg
        print(
            f"{n:>7}  {agg:>9.1f} ({agg / base:.2f}×)  {statistics.median(r[0] for r in results):>18.3f}  "
            f"{statistics.median(r[1] for r in results):>13.3f}  {tokens:>6}"
        )


if __name__ == "__main__":
    main()
