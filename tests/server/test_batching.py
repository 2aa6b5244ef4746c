"""Continuous batching (`--max-batch`): concurrent requests decode together and each gets what
it gets alone (greedy), through the official `openai` client; a client that leaves stops only its
own request; the batch shows in /metrics."""

import threading

import openai
import pytest
import requests

from conftest import TRAINED, Server

PROMPTS = [
    "What is a package manager?",
    "Tell me about the history of Unix and the GNU project in a few words.",
    "Hello",
    "Which file holds the list of mounted file systems?",
]


@pytest.fixture(scope="module")
def batching(request, tmp_path_factory):
    s = Server("batching", TRAINED, tmp_path_factory.mktemp("batching"), "--max-batch", "4", "--state-cache", "0")
    request.addfinalizer(s.stop)
    return s


def client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)


def ask(s, prompt, max_tokens, c=None):
    r = (c or client(s)).chat.completions.create(
        model=s.model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


def test_concurrent_requests_get_what_each_gets_alone(batching):
    lengths = [24, 40, 16, 32]
    alone = [ask(batching, p, n) for p, n in zip(PROMPTS, lengths)]
    before = batching.metrics()
    together = [None] * len(PROMPTS)
    # Clients are made before the barrier: making one takes tens of milliseconds of Python (an
    # SSL context), which under load staggered the requests by about as long as each one runs.
    clients = [client(batching) for _ in PROMPTS]
    start = threading.Barrier(len(PROMPTS))

    def worker(i):
        start.wait()
        together[i] = ask(batching, PROMPTS[i], lengths[i], clients[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    after = batching.metrics()
    passes = after["flashmoe_decode_passes_total"] - before["flashmoe_decode_passes_total"]
    rows = after["flashmoe_decode_rows_total"] - before["flashmoe_decode_rows_total"]
    decoded = sum(n for _, _, n in alone) - len(PROMPTS)  # the first token of each comes from prefill
    assert rows >= decoded - len(PROMPTS)
    # Decoded together: far fewer passes than tokens (alone, each token is a pass of its own).
    assert passes < 0.6 * rows, (passes, rows)
    assert after["flashmoe_requests_in_flight"] == 0


def test_a_client_that_leaves_stops_only_its_own_request(batching):
    expected = ask(batching, PROMPTS[0], 48)
    result = {}

    def steady():
        result["steady"] = ask(batching, PROMPTS[0], 48)

    t = threading.Thread(target=steady)
    t.start()
    # A streamed request beside it, dropped after a few chunks.
    stream = client(batching).chat.completions.create(
        model=batching.model,
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    t.join()
    assert result["steady"] == expected


def test_bad_max_batch_is_refused(tmp_path):
    import subprocess

    from conftest import BIN

    for bad in ["0", "100000"]:
        r = subprocess.run([str(BIN), "serve", "--model", str(TRAINED), "--max-batch", bad], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "--max-batch must be between 1 and" in r.stderr


def test_health_after_batches(batching):
    assert requests.get(batching.url + "/health", timeout=10).status_code == 200
