"""What `flashmoe serve` says about itself: the start-up block and one log line per request on
stderr, and `/health`. Values are checked against the API's own usage numbers (official clients),
the model's config.json and manifest.json, /proc/meminfo and an O_DIRECT open done here."""

import json
import re
import subprocess
from pathlib import Path

import anthropic
import openai
import pytest
import requests

from conftest import BIN, TRAINED, Server

# `done request=1 endpoint=/v1/chat/completions prompt_tokens=12 ...`: the request log line.
DONE = re.compile(r"\bdone (request=\d+ .*)$")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The trained model converted to our packed format (its experts are what `--io` reads)."""
    out = tmp_path_factory.mktemp("observe") / "trained-packed"
    subprocess.run([str(BIN), "convert", str(TRAINED), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def server(request, packed, tmp_path_factory):
    s = Server("observe", packed, tmp_path_factory.mktemp("observe-serve"), "--state-cache", "64M")
    request.addfinalizer(s.stop)
    return s


def log_text(server):
    server.log.flush()
    return Path(server.log_path).read_text()


def request_lines(server):
    """Fields of every request log line so far, in order."""
    out = []
    for line in log_text(server).splitlines():
        m = DONE.search(line)
        if m:
            out.append(dict(kv.split("=", 1) for kv in m.group(1).split()))
    return out


def expected_io(model_dir):
    """The mode and reason start of `--io auto` for this folder on the CPU, decided here from the
    facts: experts that fit in available memory (no RAM tier asked for) are computed in place on
    the mapped files."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    expert_bytes = sum(e["stride"] * e["num_experts"] for e in manifest["experts"])
    meminfo = Path("/proc/meminfo").read_text()
    available = int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M).group(1)) * 1024
    assert expert_bytes < available * 0.9, "the tiny model's experts fit in RAM on any test machine"
    return "mmap", "auto: computed in place on the mapped files ("


def test_health_reports_readiness_device_and_io(server, packed):
    h = requests.get(server.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["ready"] is True
    assert h["model"] == packed.name
    assert h["device"].startswith("cpu")
    mode, reason = expected_io(packed)
    assert h["io"]["mode"] == mode
    assert h["io"]["reason"].startswith(reason), h["io"]
    assert h["generating"] is False


def test_startup_block(server, packed):
    log = log_text(server)
    cfg = json.loads((packed / "config.json").read_text())
    assert f"model {packed.name}: qwen3_5_moe from {packed} (packed (flashmoe convert))" in log, log
    assert f"{cfg['num_hidden_layers']} layers, {cfg['num_experts']} experts, top-{cfg['num_experts_per_tok']} (exact)" in log
    assert re.search(r"INFO flashmoe_server: device: cpu", log), log
    h = requests.get(server.url + "/health", timeout=10).json()
    # The same reason in the log as in /health, after the expert sizes.
    assert re.search(r"experts: [\d.]+ \S+ mapped in place; io mmap \(" + re.escape(h["io"]["reason"]), log), log
    assert "memory: non-expert weights" in log and "conversation-state cache up to 64.0 MiB" in log, log
    assert f"listening on http://127.0.0.1:{server.port}" in log
    # Plain text in a log file: no terminal colour codes.
    assert "\x1b[" not in log


def test_one_log_line_per_request_with_the_usage_the_api_returned(server):
    before = len(request_lines(server))
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What is a package manager?"}]
    first = oa.chat.completions.create(model=server.model, messages=messages, max_tokens=5)
    # The same conversation, one turn longer: resumed from the saved state.
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And apt?"}]
    second = oa.chat.completions.create(model=server.model, messages=messages, max_tokens=5)
    ant = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    msg = ant.messages.create(model=server.model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    comp = oa.completions.create(model=server.model, prompt="The history of", max_tokens=3)

    lines = request_lines(server)[before:]
    assert [x["endpoint"] for x in lines] == [
        "/v1/chat/completions", "/v1/chat/completions", "/v1/messages", "/v1/completions"]
    ids = [int(x["request"]) for x in lines]
    assert ids == sorted(ids) and len(set(ids)) == 4
    for line, r in [(lines[0], first), (lines[1], second), (lines[3], comp)]:
        assert int(line["prompt_tokens"]) == r.usage.prompt_tokens
        assert int(line["completion_tokens"]) == r.usage.completion_tokens
        assert line["finish"] == {"length": "length", "stop": "stop"}[r.choices[0].finish_reason] or (
            r.choices[0].finish_reason == "stop" and line["finish"] == "stop_string")
    assert int(lines[0]["reused_tokens"]) == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and int(lines[1]["reused_tokens"]) == cached
    assert int(lines[2]["prompt_tokens"]) == msg.usage.input_tokens
    assert int(lines[2]["completion_tokens"]) == msg.usage.output_tokens
    assert lines[2]["finish"] == {"max_tokens": "length", "end_turn": "stop"}[msg.stop_reason]
    for x in lines:
        assert float(x["prefill_tok_s"]) > 0
        if int(x["completion_tokens"]) > 1:
            assert float(x["decode_tok_s"]) > 0
        assert float(x["secs"]) > 0


def test_json_logs(request, packed, tmp_path_factory):
    s = Server("observe-json", packed, tmp_path_factory.mktemp("observe-json"), "--log-format", "json")
    request.addfinalizer(s.stop)
    oa = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = oa.chat.completions.create(model=s.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    # Every line of stderr is one JSON object.
    events = [json.loads(line) for line in log_text(s).splitlines()]
    assert all(e["level"] in ("INFO", "WARN") and e["target"].startswith("flashmoe") for e in events), events
    messages = [e["message"] for e in events]
    assert any(m.startswith(f"model {packed.name}: qwen3_5_moe") for m in messages), messages
    assert f"listening on http://127.0.0.1:{s.port}" in messages
    (done,) = [e for e in events if e["message"] == "done"]
    assert done["endpoint"] == "/v1/chat/completions" and done["request"] == 1
    assert done["prompt_tokens"] == r.usage.prompt_tokens
    assert done["completion_tokens"] == r.usage.completion_tokens
    assert done["finish"] == {"length": "length", "stop": "stop"}[r.choices[0].finish_reason]
    assert isinstance(done["decode_tok_s"], float) and done["secs"] > 0
