#!/usr/bin/env python3
"""`flashmoe chat` in a real terminal (tmux send-keys / capture-pane) against
`flashmoe serve --model testdata/models/qwen35-moe-tiny --scripted-replies FILE`:

1. a conversation turn (markdown rendered);
2. a tool call (`bash: echo …`) approved: shown, run, its output returned, the final answer shown;
3. a tool call (`read_file`) refused: "the user refused this call" goes back, the answer follows;
4. /quit, the JSONL conversation on disk, then `--resume ID` shows the history;
5. `--model`: the engine inside the chat process;
6. no arguments: the built-in chat model's own tool call (apt-cache show), approved, run, answered.

Usage: tests/chat/chat_tmux_test.py [--mock]   (build first: cargo build -p flashmoe-cli)
  --mock: use tests/chat/mock_server.py instead of `flashmoe serve` (tests the client alone).
Needs tmux (Debian: apt-get install -y tmux). Exit status 0 on success.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("FLASHMOE_BIN", os.path.join(ROOT, "target", "debug", "flashmoe"))
MODEL = os.path.join(ROOT, "testdata", "models", "qwen35-moe-tiny")
SESSION = f"flashmoe-chat-test-{os.getpid()}"

SCRIPT = [
    {"when": "hello there", "reply": "Hi! I am a **scripted** reply.\n\n- first point\n- second point"},
    {"when": "please run echo",
     "reply": "<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"echo hi-from-tool\"}}\n</tool_call>"},
    {"when": "hi-from-tool", "reply": "The command printed hi-from-tool for you."},
    {"when": "read the secret",
     "reply": "<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"/etc/hostname\"}}\n</tool_call>"},
    {"when": "refused this call", "reply": "Understood, I did not read the file."},
]


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def tmux(*args, check=True):
    return subprocess.run(["tmux", *args], check=check, capture_output=True, text=True).stdout


def screen():
    return tmux("capture-pane", "-p", "-J", "-t", SESSION, "-S", "-2000", check=False)


def wait_for(*texts, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        s = screen()
        if all(t in s for t in texts):
            return s
        time.sleep(0.1)
    fail(f"timed out waiting for {texts!r}; screen:\n{screen()}")


def type_line(text):
    tmux("send-keys", "-t", SESSION, "-l", text)
    tmux("send-keys", "-t", SESSION, "Enter")


def start_chat(url, env, extra=""):
    target = f"--url {url}" if url else ""
    cmd = f"{BIN} chat {target} {extra}; echo CHAT-EXITED-$?; sleep 600"
    envs = " ".join(f"{k}={v}" for k, v in env.items())
    tmux("kill-session", "-t", SESSION, check=False)
    tmux("-u", "new-session", "-d", "-s", SESSION, "-x", "150", "-y", "50", f"env {envs} {cmd}")


def main():
    mock = "--mock" in sys.argv[1:]
    if shutil.which("tmux") is None:
        fail("tmux is not installed (Debian/Ubuntu: apt-get install -y tmux)")
    if not os.access(BIN, os.X_OK):
        fail(f"{BIN} not found: run `cargo build -p flashmoe-cli` first")
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="flashmoe-chat-test-")
    script_path = os.path.join(tmp, "script.json")
    with open(script_path, "w") as f:
        json.dump(SCRIPT, f)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if mock:
        server_cmd = [sys.executable, os.path.join(ROOT, "tests", "chat", "mock_server.py"), script_path, str(port)]
    else:
        server_cmd = [BIN, "serve", "--model", MODEL, "--host", "127.0.0.1", "--port", str(port),
                      "--scripted-replies", script_path]
    log = open(os.path.join(tmp, "serve.log"), "w")
    server = subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 60
        while True:
            if server.poll() is not None:
                fail(f"server exited: {open(log.name).read()}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                if time.time() > end:
                    fail("server did not come up in 60 s")
                time.sleep(0.2)
        data = os.path.join(tmp, "data")
        env = {"FLASHMOE_DATA": data, "LANG": "C.UTF-8", "TERM": "xterm-256color"}
        start_chat(url, env)
        s = wait_for("/help for commands")
        m = re.search(r"conversation (\S+) · /help", s)
        if not m:
            fail(f"no conversation id on screen:\n{s}")
        cid = m.group(1)

        # 1. A plain turn, markdown rendered (bullets, no ** markers).
        type_line("hello there")
        s = wait_for("scripted reply", "second point")
        if "**scripted**" in s or "• first point" not in s:
            fail(f"markdown not rendered:\n{s}")

        # 2. A tool call, approved.
        type_line("please run echo")
        wait_for("bash: echo hi-from-tool", "Run it? [y/N]")
        type_line("y")
        s = wait_for("│ hi-from-tool", "The command printed hi-from-tool for you.")

        # 3. A tool call, refused.
        type_line("read the secret file")
        wait_for("read_file: /etc/hostname", "Run it? [y/N]")
        type_line("n")
        s = wait_for("refused", "Understood, I did not read the file.")

        # 4. Quit; the conversation is on disk; resume shows it.
        type_line("/quit")
        wait_for(f"resume with: flashmoe chat --resume {cid}", "CHAT-EXITED-0")
        path = os.path.join(data, "conversations", f"{cid}.jsonl")
        msgs = [json.loads(l) for l in open(path)]
        roles = [m["role"] for m in msgs]
        want = ["user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant", "tool", "assistant"]
        if roles != want:
            fail(f"saved roles {roles}, want {want}")
        if msgs[3]["tool_calls"][0]["function"]["name"] != "bash" or "hi-from-tool" not in msgs[4]["content"]:
            fail(f"tool call not saved: {msgs[3]} {msgs[4]}")
        if msgs[8]["content"] != "the user refused this call":
            fail(f"refusal not saved: {msgs[8]}")
        if msgs[8]["tool_call_id"] != msgs[7]["tool_calls"][0]["id"]:
            fail("tool_call_id does not match the call")

        start_chat(url, env, f"--resume {cid}")
        wait_for("> hello there", "bash: echo hi-from-tool", "The command printed hi-from-tool for you.",
                 "Understood, I did not read the file.", "/help for commands")
        type_line("/quit")
        wait_for("CHAT-EXITED-0")

        # 5. --model: the engine runs inside the chat process (no server started by us).
        if not mock:
            start_chat(None, env, f"--model {MODEL} --serve-args '--scripted-replies {script_path}'")
            wait_for("/help for commands", timeout=60)
            type_line("hello there")
            wait_for("scripted reply", "second point")
            type_line("/quit")
            wait_for("CHAT-EXITED-0")

        # 6. No arguments: the built-in chat model, its own sampled tool call (the model's
        # sampling defaults, seeded so the test is reproducible), shown, approved, run, and
        # answered from its output.
        if not mock:
            home = {**env, "FLASHMOE_HOME": os.path.join(tmp, "home")}
            start_chat(None, home, "--seed 7")
            wait_for("builtin", "/help for commands", timeout=120)
            type_line("Show me the package curl.")
            wait_for("bash: apt-cache show curl", "Run it? [y/N]", timeout=60)
            type_line("y")
            end = time.time() + 60
            while screen().count("tokens ·") < 2 or "│" not in screen():
                if time.time() > end:
                    fail(f"no answer after the approved tool call; screen:\n{screen()}")
                time.sleep(0.2)
            type_line("/quit")
            wait_for("CHAT-EXITED-0")
        print(f"ok: chat tmux test passed in {time.time() - t0:.1f} s ({'mock server' if mock else 'flashmoe serve'})")
    finally:
        tmux("kill-session", "-t", SESSION, check=False)
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
