"""Structured output and logprobs, checked by outside references: the official SDKs' own parsing
(`.parse()` with a pydantic model, tool calls), `json.loads`, the `jsonschema` validator, and
log-softmax computed here from `flashmoe logits` (the model's raw logits, one batched prefill)."""

import json
import math
import subprocess
from typing import Literal

import anthropic
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import BIN, TINY, TRAINED


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key or "none", max_retries=0, timeout=120)


def cli_json(*args, stdin=None):
    out = subprocess.run([str(BIN), *args], input=stdin, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


# Every value bounded (enums, ranges, maxLength, maxItems): the small models must be able to
# finish the object within the token limit whatever they would rather write.
FORECAST_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "sunny": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 12},
        "temps": {"type": "array", "items": {"type": "integer", "minimum": -20, "maximum": 40}, "maxItems": 3},
    },
    "required": ["city", "days", "sunny", "note", "temps"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Forecast(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)
    sunny: bool


def test_parse_with_a_pydantic_model_returns_a_validated_object(trained):
    r = client(trained).chat.completions.parse(
        model=trained.model, messages=ASK, response_format=Forecast, max_tokens=64, temperature=0
    )
    ch = r.choices[0]
    assert ch.finish_reason == "stop"
    assert isinstance(ch.message.parsed, Forecast), ch.message.content
    assert 1 <= ch.message.parsed.days <= 7


def test_json_schema_reply_validates_streamed_or_not(trained):
    c = client(trained)
    rf = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST_SCHEMA, "strict": True}}
    for temperature, seed in ((0, None), (1.0, 3), (1.0, 4)):
        r = c.chat.completions.create(model=trained.model, messages=ASK, response_format=rf, max_tokens=120,
                                      temperature=temperature, seed=seed)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), FORECAST_SCHEMA)
    stream = c.chat.completions.create(model=trained.model, messages=ASK, response_format=rf, max_tokens=120,
                                       temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    full = c.chat.completions.create(model=trained.model, messages=ASK, response_format=rf, max_tokens=120,
                                     temperature=0)
    assert text == full.choices[0].message.content


def test_json_object_reply_parses(tiny):
    # The tiny model's weights are random: whatever it prefers, the reply is a JSON object.
    c = client(tiny)
    for seed in range(3):
        r = c.chat.completions.create(model=tiny.model, messages=ASK, response_format={"type": "json_object"},
                                      max_tokens=300, temperature=1.0, seed=seed,
                                      extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        ch = r.choices[0]
        if ch.finish_reason == "stop":
            assert isinstance(json.loads(ch.message.content), dict), ch.message.content
        else:
            # Cut by the limit: still the start of an object.
            assert ch.finish_reason == "length" and ch.message.content.startswith("{"), ch.message.content


def test_thinking_on_and_a_think_budget_keep_the_constraint(tiny):
    """Thinking on and a think budget: the reply still validates. (Qwen3's template opens no
    `<think>` block, and the grammar lets the model open none, so the answer is constrained from
    its first token; a prompt that does open the block is covered by the engine's
    `the_constraint_starts_after_thinking` test.)"""
    rf = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST_SCHEMA}}
    r = client(tiny).chat.completions.create(
        model=tiny.model, messages=ASK, response_format=rf, max_tokens=200, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "think_budget": 8},
    )
    ch = r.choices[0]
    assert ch.finish_reason == "stop", ch
    jsonschema.validate(json.loads(ch.message.content), FORECAST_SCHEMA)


def test_bad_response_formats_are_400_naming_the_problem(tiny):
    c = client(tiny)
    cases = [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
         "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
         "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}, "response_format.json_schema.schema"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "yaml"}, "response_format.type"),
    ]
    for rf, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=tiny.model, messages=ASK, max_tokens=2, response_format=rf)
        assert e.value.body["param"] == param, (rf, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=tiny.model, messages=ASK, max_tokens=2, response_format=cases[1][0])
    assert "no-such-type" in e.value.body["message"]


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["CET", "UTC"]}},
        "required": ["zone"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_calls(calls, allowed):
    assert calls, "no tool call"
    for call in calls:
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_choice_required_and_named_force_valid_calls(tiny):
    c = client(tiny)
    for seed in range(2):
        r = c.chat.completions.create(model=tiny.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        assert len(r.choices[0].message.tool_calls) == 1
        check_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})
    # Parallel calls allowed: the random model may chain calls up to the limit; every call
    # returned is complete and valid.
    r = c.chat.completions.create(model=tiny.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                  max_tokens=200, temperature=1.0, seed=0)
    assert r.choices[0].finish_reason in ("tool_calls", "length")
    check_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})
    named = {"type": "function", "function": {"name": "get_time"}}
    r = c.chat.completions.create(model=tiny.model, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=200,
                                  temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(r.choices[0].message.tool_calls) == 1
    check_calls(r.choices[0].message.tool_calls, {"get_time"})
    # Streamed: the same call, assembled from the deltas.
    stream = c.chat.completions.create(model=tiny.model, messages=ASK, tools=TOOLS, tool_choice=named,
                                       max_tokens=200, temperature=0, stream=True)
    args, names, finish = {}, {}, None
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                names[tc.index] = tc.function.name or names.get(tc.index)
                args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    assert finish == "tool_calls"
    assert [(names[i], json.loads(args[i])) for i in sorted(args)] == [
        (t.function.name, json.loads(t.function.arguments)) for t in r.choices[0].message.tool_calls
    ]
    for bad, param in (({"type": "function", "function": {"name": "nope"}}, "tool_choice"),):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=tiny.model, messages=ASK, tools=TOOLS, tool_choice=bad, max_tokens=2)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=tiny.model, messages=ASK, tool_choice="required", max_tokens=2)
    assert e.value.body["param"] == "tool_choice"


def test_anthropic_tool_choice_any_and_tool(tiny):
    c = anthropic.Anthropic(base_url=tiny.url, api_key="none", max_retries=0, timeout=120)
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    for choice, allowed in (({"type": "any", "disable_parallel_tool_use": True}, {"get_weather", "get_time"}),
                            ({"type": "tool", "name": "get_weather"}, {"get_weather"})):
        m = c.messages.create(model=tiny.model, max_tokens=200, messages=ASK, tools=tools, tool_choice=choice)
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and uses, m
        for u in uses:
            assert u.name in allowed
            jsonschema.validate(u.input, SCHEMAS[u.name])
    with pytest.raises(anthropic.BadRequestError):
        c.messages.create(model=tiny.model, max_tokens=4, messages=ASK, tools=tools,
                          tool_choice={"type": "tool", "name": "nope"})


def log_softmax_rows(ids):
    """log-softmax of each position's raw logits, from `flashmoe logits` (outside the server)."""
    rows = cli_json("logits", "--model", str(TRAINED), "--ids", ",".join(map(str, ids)), "--json")["logits"]
    out = []
    for row in rows:
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        out.append([x - lse for x in row])
    return out


def check_against_logits(prompt_ids, gen_ids, logprobs, tops):
    ref = log_softmax_rows(prompt_ids + gen_ids)
    for i, (tok, lp, top) in enumerate(zip(gen_ids, logprobs, tops)):
        row = ref[len(prompt_ids) - 1 + i]
        assert abs(lp - row[tok]) < 2e-3, (i, lp, row[tok])
        # The alternatives: the most likely tokens of that row, most likely first.
        want = sorted(range(len(row)), key=lambda t: -row[t])[: len(top)]
        assert [t for t, _ in top] == want or all(abs(row[t] - row[w]) < 1e-4 for (t, _), w in zip(top, want))
        assert all(abs(v - row[t]) < 2e-3 for t, v in top)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def token_id(name):
    assert name.startswith("token_id:"), name
    return int(name.removeprefix("token_id:"))


def test_chat_logprobs_equal_log_softmax_of_the_logits(trained):
    c = client(trained)
    body = dict(model=trained.model, messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=4,
                extra_body={"return_tokens_as_token_ids": True})
    r = c.chat.completions.create(**body)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    prompt = cli_json("tokenize", "--model", str(TRAINED), "--chat", "--json", stdin=json.dumps({"messages": ASK}))
    gen = [token_id(t.token) for t in content]
    check_against_logits(prompt, gen, [t.logprob for t in content],
                         [[(token_id(a.token), a.logprob) for a in t.top_logprobs] for t in content])
    assert all(len(t.top_logprobs) == 4 for t in content)
    # Streamed: the same entries, spread over the chunks.
    streamed = []
    for chunk in c.chat.completions.create(**body, stream=True):
        for ch in chunk.choices:
            if ch.logprobs and ch.logprobs.content:
                streamed += ch.logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    # Text names and bytes: the bytes of the tokens make up the reply.
    plain = c.chat.completions.create(model=trained.model, messages=ASK, max_tokens=8, temperature=0, logprobs=True)
    assert plain.choices[0].logprobs.content[0].top_logprobs == []
    text = b"".join(bytes(t.bytes) for t in plain.choices[0].logprobs.content).decode()
    assert text.strip() == plain.choices[0].message.content.strip()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=trained.model, messages=ASK, max_tokens=2, logprobs=True, top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=trained.model, messages=ASK, max_tokens=2, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_completions_logprobs_equal_log_softmax_of_the_logits(trained):
    c = client(trained)
    prompt = cli_json("tokenize", "--model", str(TRAINED), "--json", "The package manager")
    body = dict(model=trained.model, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                extra_body={"return_tokens_as_token_ids": True})
    r = c.completions.create(**body)
    lp = r.choices[0].logprobs
    gen = [token_id(t) for t in lp.tokens]
    tops = [sorted(((token_id(k), v) for k, v in alt.items()), key=lambda kv: -kv[1]) for alt in lp.top_logprobs]
    check_against_logits(prompt, gen, lp.token_logprobs, tops)
    assert lp.text_offset == sorted(lp.text_offset)
    streamed = []
    for chunk in c.completions.create(**body, stream=True):
        for ch in chunk.choices:
            if ch.logprobs:
                streamed += ch.logprobs.token_logprobs
    assert streamed == lp.token_logprobs
