"""The official `openai` package against `flashmoe serve`."""

import json
import os
import subprocess

import openai
import pytest

from conftest import API_KEY, BIN, PARIS_ANSWER, TINY, TRAINED, tokenize_chat

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
PARIS_Q = {"role": "user", "content": "What is the weather in Paris?"}
ROME_Q = {"role": "user", "content": "And the weather in Rome?"}


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key or "none", max_retries=0, timeout=120)


def test_models(trained):
    models = client(trained).models.list()
    assert [m.id for m in models.data] == [trained.model]
    assert client(trained).models.retrieve(trained.model).id == trained.model


def test_served_names(trained, builtin_any):
    # A folder serves under its name; the built-in model as `builtin` (no hash of its cache folder).
    assert trained.model == "qwen35-moe-tiny-trained"
    assert [m.id for m in client(builtin_any).models.list().data] == ["builtin"]
    # --accept-any-model: a client that hard-codes another name is answered (by `builtin`).
    r = client(builtin_any).chat.completions.create(model="gpt-4o", messages=[PARIS_Q], max_tokens=2)
    assert r.model == "builtin" and r.choices[0].message.content is not None
    assert client(builtin_any).models.retrieve("gpt-4o").id == "builtin"


def test_chat_non_stream_usage_matches_tokenize(trained):
    messages = [{"role": "user", "content": "What is a package manager?"}]
    r = client(trained).chat.completions.create(model=trained.model, messages=messages, max_tokens=6)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert isinstance(msg.content, str) and msg.content.strip()
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == tokenize_chat(TRAINED, {"messages": messages})
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(trained):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is apt?"}]
    c = client(trained)
    # Greedy: the model's own defaults (generation_config.json) sample.
    full = c.chat.completions.create(model=trained.model, messages=messages, max_tokens=6, temperature=0)
    stream = c.chat.completions.create(
        model=trained.model, messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens
    # The second identical prompt resumed from the saved state.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens


def test_stop_string_and_seed(tiny):
    c = client(tiny)
    base = c.chat.completions.create(model=tiny.model, messages=[PARIS_Q], max_tokens=12, temperature=0.8, seed=7)
    again = c.chat.completions.create(model=tiny.model, messages=[PARIS_Q], max_tokens=12, temperature=0.8, seed=7)
    assert base.choices[0].message.content == again.choices[0].message.content
    text = base.choices[0].message.content
    if len(text) >= 4:
        cut = text[2:4]
        r = c.chat.completions.create(
            model=tiny.model, messages=[PARIS_Q], max_tokens=12, temperature=0.8, seed=7, stop=[cut]
        )
        assert r.choices[0].message.content == text[: text.index(cut)]
        assert r.choices[0].finish_reason == "stop"


def test_completions(trained):
    c = client(trained)
    r = c.completions.create(model=trained.model, prompt="The package manager", max_tokens=5, temperature=0)
    assert r.choices[0].text
    assert r.usage.completion_tokens <= 5
    s = "".join(ch.choices[0].text for ch in c.completions.create(
        model=trained.model, prompt="The package manager", max_tokens=5, temperature=0, stream=True) if ch.choices)
    assert s == r.choices[0].text


def run_cli(tmp_path, *args):
    """`flashmoe run` on the trained model (its own FLASHMOE_HOME): (stdout, summary line)."""
    env = {**os.environ, "FLASHMOE_HOME": str(tmp_path)}
    p = subprocess.run([str(BIN), "run", "--model", str(TRAINED), *args], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr.strip().splitlines()[-1]


def test_sampling_defaults_from_generation_config(trained, tmp_path):
    """A request that sets no sampling field samples as the model's generation_config.json says:
    with the same seed, the same text as `flashmoe run`, whose summary names those values."""
    cfg = json.loads((TRAINED / "generation_config.json").read_text())
    q = "What is apt?"
    c = client(trained)
    r = c.chat.completions.create(model=trained.model, messages=[{"role": "user", "content": q}], max_tokens=16, seed=5)
    out, summary = run_cli(tmp_path, "--prompt", q, "--max-tokens", "16", "--seed", "5")
    want = (f"sampler temp {cfg['temperature']} top-p {cfg['top_p']} top-k {cfg['top_k']} "
            f"repetition-penalty {cfg['repetition_penalty']} seed 5 (generation_config.json)")
    assert want in summary, summary
    assert r.choices[0].message.content == out.removesuffix("\n")
    # Explicit fields override: temperature 0 is greedy on both sides.
    g = c.chat.completions.create(model=trained.model, messages=[{"role": "user", "content": q}], max_tokens=16,
                                  temperature=0)
    out, summary = run_cli(tmp_path, "--prompt", q, "--max-tokens", "16", "--temperature", "0")
    # (the file's repetition penalty still applies, as in vLLM)
    assert f"sampler greedy repetition-penalty {cfg['repetition_penalty']} (generation_config.json and flags)" in summary, summary
    assert g.choices[0].message.content == out.removesuffix("\n")


def test_tool_call_round_trip(scripted):
    c = client(scripted)
    r = c.chat.completions.create(model=scripted.model, messages=[PARIS_Q], tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert call.id.startswith("call_")
    messages = [
        PARIS_Q,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees, sunny"},
    ]
    r2 = c.chat.completions.create(model=scripted.model, messages=messages, tools=[WEATHER_TOOL])
    assert r2.choices[0].message.content == PARIS_ANSWER
    assert r2.choices[0].finish_reason == "stop"
    assert not r2.choices[0].message.tool_calls
    # The second turn resumed from the state saved at the end of the first.
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens

    # Streamed: the deltas reassemble to the same call.
    stream = c.chat.completions.create(model=scripted.model, messages=[PARIS_Q], tools=[WEATHER_TOOL], stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "args": ""})
                entry["id"] = d.id or entry["id"]
                if d.function:
                    entry["name"] += d.function.name or ""
                    entry["args"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["args"]) == {"city": "Paris", "days": 2}
    assert calls[0]["id"].startswith("call_")

    # Third turn: the XML form (Qwen3.5) with thinking, streamed.
    messages += [{"role": "assistant", "content": PARIS_ANSWER}, ROME_Q]
    stream = c.chat.completions.create(model=scripted.model, messages=messages, tools=[WEATHER_TOOL], stream=True)
    reasoning, content, args, name = "", "", "", ""
    for chunk in stream:
        for ch in chunk.choices:
            d = ch.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            for t in d.tool_calls or []:
                name += (t.function.name or "") if t.function else ""
                args += (t.function.arguments or "") if t.function else ""
    assert reasoning == "The user asks about Rome."
    assert content == ""
    assert name == "get_weather"
    assert json.loads(args) == {"city": "Rome", "days": 3}


def test_tool_choice_none_parses_no_calls(scripted):
    c = client(scripted)
    r = c.chat.completions.create(model=scripted.model, messages=[PARIS_Q], tools=[WEATHER_TOOL], tool_choice="none")
    # Without tools the scripted call text is returned as plain text.
    assert not r.choices[0].message.tool_calls
    assert "get_weather" in r.choices[0].message.content


def test_sdk_errors(trained):
    bad = openai.OpenAI(base_url=trained.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        client(trained).chat.completions.create(model="no-such-model", messages=[PARIS_Q], max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(trained).chat.completions.create(model=trained.model, messages=[], max_tokens=2)
    assert API_KEY


def test_neutral_values_of_the_structured_fields(tiny):
    """A text response_format, logprobs false and tool_choice auto change nothing (the constrained
    modes and logprobs themselves: test_structured.py)."""
    c = client(tiny)
    r = c.chat.completions.create(model=tiny.model, messages=[PARIS_Q], max_tokens=2,
                                  response_format={"type": "text"}, logprobs=False,
                                  tools=[WEATHER_TOOL], tool_choice="auto")
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    assert r.choices[0].logprobs is None


def test_logit_bias_steers_greedy_decoding(tiny):
    c = client(tiny)

    def gen(n, bias=None):
        r = c.completions.create(model=tiny.model, prompt="The weather in Paris", max_tokens=n, temperature=0,
                                 **({"logit_bias": bias} if bias else {}))
        return r.choices[0].text

    plain = gen(3)
    # +100 on one token: greedy decoding emits it at every step.
    forced = gen(1, {"17": 100})
    assert gen(4, {"17": 100}) == forced * 4
    # -100 on the token greedy decoding picked first: something else comes first.
    first = c.completions.create(model=tiny.model, prompt="The weather in Paris", max_tokens=1, temperature=0)
    banned_text = first.choices[0].text
    ids = json.loads(subprocess.run(
        [str(BIN), "tokenize", "--model", str(TINY), "--json", "The weather in Paris" + banned_text],
        capture_output=True, text=True, check=True).stdout)
    prompt_ids = json.loads(subprocess.run(
        [str(BIN), "tokenize", "--model", str(TINY), "--json", "The weather in Paris"],
        capture_output=True, text=True, check=True).stdout)
    assert ids[:len(prompt_ids)] == prompt_ids
    banned = ids[len(prompt_ids)]
    assert not gen(3, {str(banned): -100}).startswith(banned_text) or banned_text == ""
    assert plain.startswith(banned_text)
    with pytest.raises(openai.BadRequestError) as e:
        gen(1, {"999999999": 5})
    assert e.value.body["param"] == "logit_bias"


def test_tool_call_cut_by_max_tokens_is_never_a_valid_call(scripted):
    """Cut anywhere, a reply holds either the complete call or no call; finish_reason says why."""
    c = client(scripted)
    full = c.chat.completions.create(model=scripted.model, messages=[PARIS_Q, ROME_Q], tools=[WEATHER_TOOL])
    assert full.choices[0].finish_reason == "tool_calls"
    n = full.usage.completion_tokens
    seen_cut_call = False
    for limit in range(1, n):
        r = c.chat.completions.create(model=scripted.model, messages=[PARIS_Q, ROME_Q], tools=[WEATHER_TOOL],
                                      max_tokens=limit)
        ch = r.choices[0]
        assert ch.finish_reason == "length", (limit, ch)
        for call in ch.message.tool_calls or []:
            assert json.loads(call.function.arguments) == {"city": "Rome", "days": 3}, (limit, call)
        seen_cut_call |= not ch.message.tool_calls
    assert seen_cut_call
