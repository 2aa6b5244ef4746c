"""Errors, floods of bad requests, concurrent streams, disconnects, state reuse."""

import json
import threading
import time

import requests

from conftest import API_KEY


def err(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert isinstance(e["message"], str) and e["message"]
    if code is not None:
        assert e["code"] == code
    if param is not None:
        assert e["param"] == param
    return e


def chat(model, content="Hello", **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


def test_error_kinds(tiny):
    url = tiny.url + "/v1/chat/completions"
    e = err(requests.post(url, data="{not json", headers={"Content-Type": "application/json"}, timeout=10), 400, code="invalid_json")
    assert e["type"] == "invalid_request_error"
    err(requests.post(url, data="[1, 2]", headers={"Content-Type": "application/json"}, timeout=10), 400, code="invalid_json")
    err(requests.post(url, data="", headers={"Content-Type": "application/json"}, timeout=10), 400, code="invalid_json")
    # A body that does not say it is JSON (what a web page can send without asking) is refused.
    body = json.dumps(chat(tiny.model, max_tokens=1))
    for ct in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = requests.post(url, data=body, headers={"Content-Type": ct} if ct else {}, timeout=10)
        e = err(r, 415, code="unsupported_media_type")
        assert "application/json" in e["message"]
    r = requests.post(url, data=body, headers={"Content-Type": "application/json; charset=utf-8"}, timeout=10)
    assert r.status_code == 200, r.text
    err(tiny.post("/v1/chat/completions", {"model": tiny.model}), 400, param="messages")
    err(tiny.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}), 400, param="model")
    err(tiny.post("/v1/chat/completions", {"model": tiny.model, "messages": "hi"}), 400, code="invalid_type", param="messages")
    err(tiny.post("/v1/chat/completions", chat(tiny.model, max_tokens="ten")), 400, code="invalid_type", param="max_tokens")
    err(tiny.post("/v1/chat/completions", chat(tiny.model, max_tokens=0)), 400, param="max_tokens")
    err(tiny.post("/v1/chat/completions", chat(tiny.model, temperature="hot")), 400, param="temperature")
    err(tiny.post("/v1/chat/completions", chat(tiny.model, temperature=7)), 400, param="temperature")
    err(tiny.post("/v1/chat/completions", chat(tiny.model, stream="yes")), 400, param="stream")
    err(tiny.post("/v1/chat/completions", chat(tiny.model, stop=[1])), 400, param="stop")
    # Stop strings are checked against every token: bounded in number and size, none empty.
    err(tiny.post("/v1/chat/completions", chat(tiny.model, stop=["x%d" % i for i in range(17)])), 400, param="stop")
    err(tiny.post("/v1/chat/completions", chat(tiny.model, stop=["y" * 513])), 400, param="stop")
    err(tiny.post("/v1/chat/completions", chat(tiny.model, stop=[""])), 400, param="stop")
    r = tiny.post("/v1/messages", {"model": tiny.model, "max_tokens": 2, "stop_sequences": ["z" * 10**6],
                                   "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "stop_sequences" in r.json()["error"]["message"], r.text
    r = tiny.post("/v1/chat/completions", chat(tiny.model, max_tokens=2, stop=["s%d" % i for i in range(16)]))
    assert r.status_code == 200, r.text
    err(tiny.post("/v1/chat/completions", {"model": tiny.model, "messages": [{"role": "wizard", "content": "x"}]}),
        400, param="messages[0].role")
    err(tiny.post("/v1/chat/completions", {"model": tiny.model, "messages": [{"role": "user"}]}),
        400, param="messages[0].content")
    err(tiny.post("/v1/chat/completions", chat("gpt-17")), 404, code="model_not_found")
    err(tiny.post("/v1/completions", {"model": tiny.model}), 400, param="prompt")
    err(tiny.post("/v1/completions", {"model": tiny.model, "prompt": 5}), 400, param="prompt")
    r = requests.get(tiny.url + "/v1/nothing", timeout=10)
    err(r, 404)


def test_bad_api_key(trained):
    body = chat(trained.model, max_tokens=1)
    url = trained.url + "/v1/chat/completions"
    e = err(requests.post(url, json=body, timeout=10), 401, code="invalid_api_key")
    assert e["type"] == "authentication_error"
    err(requests.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=10), 401)
    r = requests.post(trained.url + "/v1/messages", json={"model": trained.model, "max_tokens": 1,
                      "messages": [{"role": "user", "content": "x"}]}, headers={"x-api-key": "nope"}, timeout=10)
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {"type": "authentication_error", "message": r.json()["error"]["message"]}}
    # /health stays open; /metrics needs the key too; the right key works in either header.
    assert requests.get(trained.url + "/health", timeout=10).status_code == 200
    assert requests.get(trained.url + "/metrics", timeout=10).status_code == 401
    assert requests.get(trained.url + "/metrics", headers={"x-api-key": API_KEY}, timeout=10).status_code == 200
    r = requests.get(trained.url + "/v1/models", headers={"x-api-key": API_KEY}, timeout=10)
    assert r.status_code == 200


def test_over_context_is_400(small_context):
    s = small_context
    long = "word " * 100
    e = err(s.post("/v1/chat/completions", chat(s.model, long)), 400, code="context_length_exceeded")
    assert "64" in e["message"]
    err(s.post("/v1/completions", {"model": s.model, "prompt": long}), 400, code="context_length_exceeded")
    r = s.post("/v1/messages", {"model": s.model, "max_tokens": 5, "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # A prompt that fits still works, its reply bounded by the context.
    r = s.post("/v1/chat/completions", chat(s.model, "hi", max_tokens=500))
    assert r.status_code == 200
    assert r.json()["usage"]["total_tokens"] <= 64 + 1


def test_no_max_tokens_is_bounded_and_finish_reason_says_why(small_context):
    """Without max_tokens the reply gets min(4096, what the context leaves) (README, Commands):
    here the 64-token context bounds it, and a reply cut there reports `length`."""
    s = small_context
    for content in ["Tell me everything.", "hi", "What is the weather in Paris?"]:
        r = s.post("/v1/chat/completions", chat(s.model, content))
        assert r.status_code == 200, r.text
        body = r.json()
        total = body["usage"]["total_tokens"]
        assert total <= 64, body["usage"]
        finish = body["choices"][0]["finish_reason"]
        assert finish == ("length" if total == 64 else "stop"), (finish, body["usage"])


def test_thousand_malformed_requests_then_a_good_one(tiny):
    bad = [
        ("{", None),
        ('{"model": 1}', None),
        ("null", None),
        (None, {"model": tiny.model, "messages": [{"role": "user", "content": 5}]}),
        (None, {"model": tiny.model, "messages": [], "max_tokens": -3}),
        (None, {"model": tiny.model, "messages": [{"role": "user", "content": "x"}], "top_p": "a"}),
        # 0 would divide by zero (the CLI refuses it as well).
        (None, {"model": tiny.model, "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}),
    ]
    url = tiny.url + "/v1/chat/completions"
    with requests.Session() as http:
        for i in range(1000):
            data, js = bad[i % len(bad)]
            r = http.post(url, data=data, json=js, headers={"Content-Type": "application/json"}, timeout=10)
            assert r.status_code == 400, (i, r.text)
            assert "error" in r.json()
    r = tiny.post("/v1/chat/completions", chat(tiny.model, "Still there?", max_tokens=3))
    assert r.status_code == 200
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert requests.get(tiny.url + "/health", timeout=10).json()["status"] == "ok"


def stream_chat(server, body):
    """Streams a chat completion with plain HTTP; returns (content, finish_reason, usage)."""
    text, finish, usage = "", None, None
    with requests.post(server.url + "/v1/chat/completions", json={**body, "stream": True},
                       headers=server.headers(), stream=True, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for ch in chunk["choices"]:
                text += ch["delta"].get("content") or ""
                finish = ch["finish_reason"] or finish
    return text, finish, usage


def test_fifty_concurrent_streams(tiny):
    prompts = [f"Question number {k}" for k in range(5)]
    results = [None] * 50
    errors = []

    def client(i):
        try:
            body = chat(tiny.model, prompts[i % 5], max_tokens=4, stream_options={"include_usage": True})
            results[i] = stream_chat(tiny, body)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    refs = [tiny.post("/v1/chat/completions", chat(tiny.model, p, max_tokens=4)).json() for p in prompts]
    for i, (text, finish, usage) in enumerate(results):
        ref = refs[i % 5]
        assert text == ref["choices"][0]["message"]["content"], i
        assert finish == ref["choices"][0]["finish_reason"]
        assert usage["completion_tokens"] == ref["usage"]["completion_tokens"]
    assert tiny.metrics()["flashmoe_queue_length"] == 0


def test_disconnect_frees_the_engine(tiny):
    before = tiny.metrics()["flashmoe_generations_cancelled_total"]
    body = chat(tiny.model, "Tell me everything.", max_tokens=3000, stream=True)
    r = requests.post(tiny.url + "/v1/chat/completions", json=body, stream=True, timeout=60)
    seen = 0
    for line in r.iter_lines():
        if line.startswith(b"data: "):
            seen += 1
            if seen >= 4:
                break
    r.close()  # the client goes away mid-stream
    t0 = time.time()
    follow = tiny.post("/v1/chat/completions", chat(tiny.model, "Quick one", max_tokens=2))
    elapsed = time.time() - t0
    assert follow.status_code == 200
    # 3000 tokens would take far longer; the cancelled generation stopped at once.
    assert elapsed < 10, elapsed
    m = tiny.metrics()
    assert m["flashmoe_generations_cancelled_total"] == before + 1
    assert m['flashmoe_generations_by_finish_total{reason="cancelled"}'] >= 1
    assert m["flashmoe_generation_active"] == 0


def test_state_reuse_matches_cold_run(tiny, tiny_cold):
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    first = tiny.post("/v1/chat/completions", {"model": tiny.model, "messages": turn1, "max_tokens": 10}).json()
    reply = first["choices"][0]["message"]
    turn2 = turn1 + [{"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "Another one?"}]
    before = tiny.metrics()
    warm = tiny.post("/v1/chat/completions", {"model": tiny.model, "messages": turn2, "max_tokens": 10}).json()
    after = tiny.metrics()
    cold = tiny_cold.post("/v1/chat/completions", {"model": tiny.model, "messages": turn2, "max_tokens": 10}).json()
    assert warm["choices"][0]["message"] == cold["choices"][0]["message"]
    assert warm["usage"]["completion_tokens"] == cold["usage"]["completion_tokens"]
    assert warm["usage"]["prompt_tokens"] == cold["usage"]["prompt_tokens"]
    reused = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert reused >= first["usage"]["prompt_tokens"]
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert after["flashmoe_state_cache_hits_total"] == before["flashmoe_state_cache_hits_total"] + 1
    assert after["flashmoe_state_cache_reused_tokens_total"] - before["flashmoe_state_cache_reused_tokens_total"] == reused
    skipped = after["flashmoe_prefill_tokens_total"] - before["flashmoe_prefill_tokens_total"]
    assert skipped == warm["usage"]["prompt_tokens"] - reused
    assert tiny_cold.metrics()["flashmoe_state_cache_hits_total"] == 0


def test_foreign_host_or_origin_is_refused(tiny):
    """DNS rebinding and cross-site requests: a web page addressing the loopback server through
    its own name (Host) or from its own origin (Origin) is refused; clients naming the server as
    localhost / 127.0.0.1, and clients that send no Origin, are served."""
    body = chat(tiny.model, max_tokens=2)
    url = tiny.url + "/v1/chat/completions"
    r = requests.post(url, json=body, headers={"Host": "attacker.example:%d" % tiny.port}, timeout=60)
    e = err(r, 403, code="forbidden_host")
    assert "attacker.example" in e["message"] and "--allowed-host" in e["message"]
    r = requests.post(url, data=json.dumps(body), headers={"Origin": "http://attacker.example",
                      "Content-Type": "text/plain"}, timeout=60)
    err(r, 403, code="forbidden_host")
    assert requests.get(tiny.url + "/health", headers={"Host": "attacker.example"}, timeout=10).status_code == 403
    for host in ("localhost:%d" % tiny.port, "127.0.0.1:%d" % tiny.port):
        r = requests.post(url, json=body, headers={"Host": host}, timeout=60)
        assert r.status_code == 200, r.text
    r = requests.post(url, json=body, headers={"Origin": "http://localhost:3000"}, timeout=60)
    assert r.status_code == 200, r.text
