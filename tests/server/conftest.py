"""Fixtures for the `flashmoe serve` tests.

Nothing is built here: the tests use `target/debug/flashmoe`, which CI builds with cargo before
running pytest (set FLASHMOE_BIN to use another binary). Each server runs on a free localhost port
with its own temporary directory and is killed at the end of the session.
"""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("FLASHMOE_BIN", ROOT / "target" / "debug" / "flashmoe"))
TRAINED = ROOT / "models" / "qwen35-moe-tiny-trained"
TINY = ROOT / "testdata" / "models" / "qwen35-moe-tiny"
API_KEY = "test-key-123"

# Scripted replies of the tool-call tests (see `flashmoe serve --help`, --scripted-replies): the
# prompt is prefilled through the engine, then these texts are emitted instead of sampled tokens.
PARIS_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
PARIS_ANSWER = "It is 22 degrees and sunny in Paris."
ROME_CALL = (
    "<think>\nThe user asks about Rome.\n</think>\n\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
SCRIPT = [
    {"when": "weather in Paris", "reply": PARIS_CALL},
    {"when": "22 degrees", "reply": PARIS_ANSWER},
    {"when": "weather in Rome", "reply": ROME_CALL},
    "Scripted fallback reply.",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name, model, tmp, *args, api_key=None):
        """`model` None: no --model (the built-in model, unpacked under `tmp`)."""
        if not BIN.exists():
            pytest.fail(f"{BIN} not found: build it first with `cargo build -p flashmoe-cli` (CI does)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model.name if model else "builtin"
        self.api_key = api_key
        self.log_path = tmp / f"{name}.log"
        cmd = [str(BIN), "serve", *(["--model", str(model)] if model else []), "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "FLASHMOE_HOME": str(tmp / "flashmoe-home")}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"flashmoe serve exited: {self.log_path.read_text()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"flashmoe serve did not become healthy: {self.log_path.read_text()}")

    def headers(self):
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path, body, **kw):
        return requests.post(self.url + path, json=body, headers=self.headers(), timeout=120, **kw)

    def metrics(self):
        text = requests.get(self.url + "/metrics", headers=self.headers(), timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("flashmoe-serve")


def _server(request, tmp_root, *a, **kw):
    s = Server(*a, **kw)
    request.addfinalizer(s.stop)
    return s


@pytest.fixture(scope="session")
def trained(request, tmp_root):
    """The small trained model (ChatML template), API key required."""
    return _server(request, tmp_root, "trained", TRAINED, tmp_root, api_key=API_KEY)


@pytest.fixture(scope="session")
def tiny(request, tmp_root):
    """The tiny random model (real Qwen3 template, tools), state cache on."""
    return _server(request, tmp_root, "tiny", TINY, tmp_root, "--state-cache", "256M")


@pytest.fixture(scope="session")
def tiny_cold(request, tmp_root):
    """Same model with state reuse off: the cold reference."""
    return _server(request, tmp_root, "tiny-cold", TINY, tmp_root, "--state-cache", "0")


@pytest.fixture(scope="session")
def scripted(request, tmp_root):
    """Tiny model with scripted replies (deterministic tool calls)."""
    path = tmp_root / "script.json"
    path.write_text(json.dumps(SCRIPT))
    return _server(request, tmp_root, "scripted", TINY, tmp_root, "--scripted-replies", str(path))


@pytest.fixture(scope="session")
def builtin_any(request, tmp_root):
    """No --model (the built-in model), answering to any model name."""
    return _server(request, tmp_root, "builtin-any", None, tmp_root, "--accept-any-model")


@pytest.fixture(scope="session")
def small_context(request, tmp_root):
    """A 64-token context, for the over-context error."""
    return _server(request, tmp_root, "small-context", TINY, tmp_root, "--max-context", "64")


def tokenize_chat(model_dir, body):
    """Prompt token count of a chat request as `flashmoe tokenize --chat` renders it."""
    out = subprocess.run(
        [str(BIN), "tokenize", "--model", str(model_dir), "--chat", "--json"],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        check=True,
    )
    return len(json.loads(out.stdout))
