"""The built-in chat model (models/qwen35-moe-tiny-chat) through `flashmoe serve` and the official
`openai` client: a sampled (seeded, not scripted) reply to a package request is a tool call that the
server parses from the model's Qwen3.5 XML, and after the tool result the model answers in text."""

import json
import os
import subprocess
import sys

import openai

from conftest import BIN, ROOT

sys.path.insert(0, str(ROOT / "scripts" / "train"))
import make_chat_data as mcd  # noqa: E402  (renders as the training data was rendered)

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


def test_builtin_template_renders_as_in_training(tmp_path):
    """flashmoe renders the built-in model's template exactly as jinja2 rendered the training
    conversations (scripts/train/make_chat_data.py, transformers' settings), tools and tool turns
    included: the prompt at inference is the text the model was trained on."""
    tpl = mcd.make_env().from_string((ROOT / "models" / "qwen35-moe-tiny-chat" / "chat_template.jinja").read_text())
    args = {"command": "apt-cache show curl"}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Show me the package curl."},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "c1", "content": CURL_SHOW},
        {"role": "assistant", "content": "curl is a command line tool for transferring data with URL syntax."},
        {"role": "user", "content": "Which files does it install?"},
    ]
    for tools in (True, False):
        body = {"messages": messages, **({"tools": TOOLS} if tools else {})}
        out = subprocess.run([str(BIN), "tokenize", "--model", "builtin", "--chat"], input=json.dumps(body),
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "FLASHMOE_HOME": str(tmp_path)}).stdout
        py_messages = json.loads(json.dumps(messages))
        py_messages[2]["tool_calls"][0]["function"]["arguments"] = args  # as the server parses it
        want = mcd.render(tpl, py_messages, tools, add_generation_prompt=True)
        assert out.rstrip("\n") == want.rstrip("\n")
        assert ("<function=bash>" in want) and (("# Tools" in want) == tools)
