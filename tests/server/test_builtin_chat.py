"""The built-in chat model (models/qwen35-moe-tiny-chat) through `flashmoe serve` and the official
`openai` client: a sampled (seeded, not scripted) reply to a package request is a tool call that the
server parses from the model's Qwen3.5 XML, and after the tool result the model answers in text."""

import json

import openai

from conftest import ROOT

# The chat client's two tools, as crates/chat/src/tools.rs sends them (a Rust test keeps the file equal).
TOOLS = json.loads((ROOT / "testdata" / "chat" / "tools.json").read_text())

# What `apt-cache show curl` printed on a Debian 12 machine (the tool result the client would send).
CURL_SHOW = """Package: curl
Version: 7.88.1-10+deb12u14
Installed-Size: 489
Maintainer: Alessandro Ghedini <ghedo@debian.org>
Architecture: amd64
Depends: libc6 (>= 2.34), libcurl4 (= 7.88.1-10+deb12u14), zlib1g (>= 1:1.1.4)
Description: command line tool for transferring data with URL syntax
Description-md5: f83293d10df083ae6f7bb7d01642913c
Multi-Arch: foreign
Homepage: https://curl.se/
Section: web
Priority: optional
Filename: pool/main/c/curl/curl_7.88.1-10+deb12u14_amd64.deb
Size: 315708

[exit code 0]"""


def test_builtin_model_calls_a_tool_and_answers(builtin_any):
    c = openai.OpenAI(base_url=builtin_any.url + "/v1", api_key="none", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "Show me the package curl."}]
    r = c.chat.completions.create(model="builtin", messages=msgs, tools=TOOLS, seed=7, max_tokens=100)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    (call,) = ch.message.tool_calls
    assert call.function.name == "bash"
    args = json.loads(call.function.arguments)
    assert set(args) == {"command"} and "curl" in args["command"], args

    msgs.append({"role": "assistant", "content": ch.message.content or "", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "bash", "arguments": call.function.arguments}}]})
    msgs.append({"role": "tool", "tool_call_id": call.id, "content": CURL_SHOW})
    r = c.chat.completions.create(model="builtin", messages=msgs, tools=TOOLS, seed=7, max_tokens=200)
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and not ch.message.tool_calls, ch
    assert "curl" in ch.message.content, ch.message.content
