"""The official `anthropic` package against `flashmoe serve` (/v1/messages)."""

import anthropic
import pytest

from conftest import PARIS_ANSWER

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the weather forecast for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
PARIS_Q = {"role": "user", "content": "What is the weather in Paris?"}


def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=server.api_key or "none", max_retries=0, timeout=120)


def test_messages_non_stream_and_stream(trained):
    c = client(trained)
    # Greedy, to compare the two: the model's own defaults (generation_config.json) sample.
    kw = dict(model=trained.model, max_tokens=6, extra_body={"temperature": 0}, system="You are terse.",
              messages=[{"role": "user", "content": "Where are logs kept?"}])
    m = c.messages.create(**kw)
    assert m.type == "message" and m.role == "assistant"
    assert m.stop_reason in ("end_turn", "max_tokens")
    (block,) = m.content
    assert block.type == "text" and block.text
    assert 1 <= m.usage.output_tokens <= 6
    with c.messages.stream(**kw) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == block.text
    assert final.content[0].text == block.text
    assert final.stop_reason == m.stop_reason
    assert final.usage.output_tokens == m.usage.output_tokens


def test_tool_use_round_trip(scripted):
    c = client(scripted)
    m = c.messages.create(model=scripted.model, max_tokens=200, messages=[PARIS_Q], tools=[WEATHER_TOOL])
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    assert use.input == {"city": "Paris", "days": 2}
    messages = [
        PARIS_Q,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "22 degrees, sunny"}]},
    ]
    m2 = c.messages.create(model=scripted.model, max_tokens=200, messages=messages, tools=[WEATHER_TOOL])
    assert m2.stop_reason == "end_turn"
    assert [b.type for b in m2.content] == ["text"]
    assert m2.content[0].text == PARIS_ANSWER
    assert m2.usage.cache_read_input_tokens > 0

    # Streamed: tool_use block with input_json_delta events.
    with c.messages.stream(model=scripted.model, max_tokens=200, messages=[PARIS_Q], tools=[WEATHER_TOOL]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris", "days": 2}
    assert final.stop_reason == "tool_use"


def test_thinking_block_streamed(scripted):
    # A third turn after the Paris round trip (resumes from its saved state).
    messages = [
        PARIS_Q,
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 2}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "22 degrees, sunny"}]},
        {"role": "assistant", "content": PARIS_ANSWER},
        {"role": "user", "content": "And the weather in Rome?"},
    ]
    with client(scripted).messages.stream(
        model=scripted.model, max_tokens=200, messages=messages, tools=[WEATHER_TOOL]
    ) as s:
        final = s.get_final_message()
    types = [b.type for b in final.content]
    assert types == ["thinking", "tool_use"]
    assert final.content[0].thinking == "The user asks about Rome."
    assert final.content[1].input == {"city": "Rome", "days": 3}


def test_errors_anthropic_shape(trained):
    bad = anthropic.Anthropic(base_url=trained.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model=trained.model, max_tokens=5, messages=[PARIS_Q])
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        client(trained).messages.create(model="nope", max_tokens=5, messages=[PARIS_Q])
    assert e.value.body["error"]["type"] == "not_found_error"
    r = trained.post("/v1/messages", {"model": trained.model, "messages": [PARIS_Q]})
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
