#!/usr/bin/env python3
"""A stand-in OpenAI-compatible server for the chat client test (`chat_tmux_test.py --mock`):
replays a scripted-replies file with the same rules as `flashmoe serve --scripted-replies`
(items `{"when": TEXT, "reply": TEXT}` match the last message; plain strings are used in order)
and streams `<tool_call>{json}</tool_call>` replies as OpenAI tool_call deltas.

Usage: mock_server.py SCRIPT.json PORT
"""
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SCRIPT = json.load(open(sys.argv[1]))
ORDER = [0]


def pick(last):
    for item in SCRIPT:
        if isinstance(item, dict) and "when" in item and item["when"] in last:
            return item["reply"]
    plain = [i if isinstance(i, str) else i["reply"] for i in SCRIPT if isinstance(i, str) or "when" not in i]
    if not plain:
        return ""
    r = plain[ORDER[0] % len(plain)]
    ORDER[0] += 1
    return r


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "mock", "object": "model"}]})
        else:
            self.send_json(404, {"error": {"message": "no route"}})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        req = json.loads(self.rfile.read(n))
        msgs = req["messages"]
        last = msgs[-1].get("content") or ""
        reply = pick(last)
        calls = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", reply, re.S)
        text = re.sub(r"\s*<tool_call>.*?</tool_call>\s*", "", reply, flags=re.S)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def send(delta, finish=None):
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        for i in range(0, len(text), 5):
            send({"content": text[i:i + 5]})
        for i, c in enumerate(calls):
            c = json.loads(c)
            send({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                                  "function": {"name": c["name"], "arguments": ""}}]})
            send({"tool_calls": [{"index": i, "function": {"arguments": json.dumps(c["arguments"])}}]})
        send({}, "tool_calls" if calls else "stop")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
