//! Anthropic Messages API: `POST /v1/messages`.
//!
//! The request is converted to OpenAI-style messages for the chat template: `system` (string or
//! text blocks) → a system message; `tool_use` blocks → the assistant's `tool_calls`; `thinking`
//! blocks → `reasoning_content`; `tool_result` blocks → `tool` messages; `tools` with
//! `input_schema` → function tools. `tool_choice` `none` drops the tools, `auto` lets the model
//! decide; `any` and `tool` (`name`) constrain the reply to tool calls (any offered tool, or
//! that one) in the model's own format, arguments valid against `input_schema` (llguidance;
//! the constraint starts after the thinking block). `thinking: {type: "enabled", budget_tokens: N}`
//! turns thinking on with a think budget of N; `{type: "disabled"}` turns it off.

use crate::api::{ApiError, ApiResult, Client, Fields, Flavor, kind, missing, new_id, parse_body};
use crate::openai::{
    KEEP_ALIVE, Prepared, Relay, check_model, collect, forced_tool_call, last_text, render, reply_budget, submit,
};
use crate::worker::Ev;
use crate::{AppState, Shared};
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use flashmoe::session::{Finish, GenerateRequest, Generation};
use flashmoe_text::SamplingParams;
use flashmoe_text::toolcall::Event;
use serde_json::{Map, Value as Json, json};
use std::convert::Infallible;

pub async fn messages(State(s): State<Shared>, client: Option<Extension<Client>>, body: Bytes) -> Response {
    match handle(s, client.map(|c| c.0).unwrap_or_default(), &body).await {
        Ok(r) => r,
        Err(e) => e.flavor(Flavor::Anthropic).into_response(),
    }
}

fn block_text(v: &Json, param: &str) -> ApiResult<String> {
    match v {
        Json::String(s) => Ok(s.clone()),
        Json::Array(blocks) => {
            let mut out = String::new();
            for b in blocks {
                match (b.get("type").and_then(Json::as_str), b.get("text").and_then(Json::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::bad(format!("{param}: only text blocks are supported here")).param(param));
                    }
                }
            }
            Ok(out)
        }
        Json::Null => Ok(String::new()),
        other => {
            Err(ApiError::bad(format!("{param}: expected a string or text blocks, got {}", kind(other))).param(param))
        }
    }
}

/// Anthropic messages → OpenAI-style messages.
fn convert_messages(system: Option<&Json>, msgs: &[Json]) -> ApiResult<Vec<Json>> {
    let mut out = Vec::new();
    if let Some(sys) = system {
        out.push(json!({"role": "system", "content": block_text(sys, "system")?}));
    }
    if msgs.is_empty() {
        return Err(ApiError::bad("messages: at least one message is required").param("messages"));
    }
    for (i, m) in msgs.iter().enumerate() {
        let o = m.as_object().ok_or_else(|| ApiError::bad(format!("messages.{i}: expected an object")))?;
        let f = Fields(o);
        let role = f.str("role").map_err(|e| e.param(format!("messages.{i}.role")))?;
        let role = role.ok_or_else(|| missing(&format!("messages.{i}.role")))?;
        if role != "user" && role != "assistant" {
            return Err(ApiError::bad(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant', got `{role}`"
            )));
        }
        let content = o.get("content").ok_or_else(|| missing(&format!("messages.{i}.content")))?;
        let blocks: Vec<Json> = match content {
            Json::String(s) => vec![json!({"type": "text", "text": s})],
            Json::Array(a) => a.clone(),
            other => {
                return Err(ApiError::bad(format!(
                    "messages.{i}.content: expected a string or an array of content blocks, got {}",
                    kind(other)
                )));
            }
        };
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            let ty = b.get("type").and_then(Json::as_str).ok_or_else(|| missing(&format!("{at}.type")))?;
            match (role, ty) {
                (_, "text") => {
                    let t = b.get("text").and_then(Json::as_str).ok_or_else(|| missing(&format!("{at}.text")))?;
                    text.push_str(t);
                }
                ("assistant", "thinking") => {
                    reasoning.push_str(b.get("thinking").and_then(Json::as_str).unwrap_or_default());
                }
                ("assistant", "redacted_thinking") => {}
                ("assistant", "tool_use") => {
                    let id = b.get("id").and_then(Json::as_str).ok_or_else(|| missing(&format!("{at}.id")))?;
                    let name = b.get("name").and_then(Json::as_str).ok_or_else(|| missing(&format!("{at}.name")))?;
                    let input = b.get("input").cloned().unwrap_or(json!({}));
                    calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input}}));
                }
                ("user", "tool_result") => {
                    let id = b
                        .get("tool_use_id")
                        .and_then(Json::as_str)
                        .ok_or_else(|| missing(&format!("{at}.tool_use_id")))?;
                    let mut result = block_text(b.get("content").unwrap_or(&Json::Null), &format!("{at}.content"))?;
                    if b.get("is_error").and_then(Json::as_bool) == Some(true) {
                        result = format!("Error: {result}");
                    }
                    if !text.is_empty() {
                        out.push(json!({"role": "user", "content": std::mem::take(&mut text)}));
                    }
                    out.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
                }
                (_, other) => {
                    return Err(ApiError::bad(format!(
                        "{at}: content blocks of type `{other}` are not supported in {role} messages"
                    )));
                }
            }
        }
        if role == "assistant" {
            let mut msg = Map::new();
            msg.insert("role".into(), "assistant".into());
            msg.insert("content".into(), Json::String(text));
            if !reasoning.is_empty() {
                msg.insert("reasoning_content".into(), Json::String(reasoning));
            }
            if !calls.is_empty() {
                msg.insert("tool_calls".into(), Json::Array(calls));
            }
            out.push(Json::Object(msg));
        } else if !text.is_empty()
            || !blocks.iter().any(|b| b.get("type").and_then(Json::as_str) == Some("tool_result"))
        {
            out.push(json!({"role": "user", "content": text}));
        }
    }
    Ok(out)
}

fn convert_tools(tools: &[Json]) -> ApiResult<(Json, Vec<(String, Json)>)> {
    let mut list = Vec::new();
    let mut known = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let name = t.get("name").and_then(Json::as_str).ok_or_else(|| missing(&format!("tools.{i}.name")))?;
        let schema = t
            .get("input_schema")
            .filter(|v| v.is_object())
            .ok_or_else(|| missing(&format!("tools.{i}.input_schema")))?;
        let mut func = Map::new();
        func.insert("name".into(), name.into());
        if let Some(d) = t.get("description").and_then(Json::as_str) {
            func.insert("description".into(), d.into());
        }
        func.insert("parameters".into(), schema.clone());
        list.push(json!({"type": "function", "function": func}));
        known.push((name.to_string(), schema.clone()));
    }
    Ok((Json::Array(list), known))
}

pub(crate) fn prepare(s: &AppState, o: &Map<String, Json>) -> ApiResult<(Prepared, bool)> {
    let f = Fields(o);
    check_model(s, &f)?;
    let max_tokens = f.count("max_tokens")?.ok_or_else(|| missing("max_tokens"))?;
    let msgs = f.array("messages")?.ok_or_else(|| missing("messages"))?;
    let messages = Json::Array(convert_messages(f.get("system"), msgs)?);
    let stream = f.bool("stream")?.unwrap_or(false);
    // (none, forced, the forced tool's name)
    let parallel = match f.object("tool_choice")? {
        Some(tc) => !Fields(tc).bool("disable_parallel_tool_use")?.unwrap_or(false),
        None => true,
    };
    let (tool_choice_none, forced, named) = match f.object("tool_choice")? {
        Some(tc) => match tc.get("type").and_then(Json::as_str) {
            Some("none") => (true, false, None),
            Some("auto") => (false, false, None),
            Some("any") => (false, true, None),
            Some("tool") => {
                let name = tc.get("name").and_then(Json::as_str).ok_or_else(|| missing("tool_choice.name"))?;
                (false, true, Some(name.to_string()))
            }
            _ => return Err(ApiError::bad("tool_choice.type: expected auto, any, tool or none").param("tool_choice")),
        },
        None => (false, false, None),
    };
    let tools = match f.array("tools")? {
        Some(t) if !t.is_empty() && !tool_choice_none => Some(convert_tools(t)?),
        _ => None,
    };
    let constraint = match forced {
        // `tool` is one call to that tool; `any` allows parallel calls unless disabled.
        true => Some(forced_tool_call(
            s,
            tools.as_ref().map(|t| &t.1),
            named.as_deref(),
            parallel && named.is_none(),
            "tool_choice",
        )?),
        false => None,
    };
    let (enable_thinking, budget) = match f.object("thinking")? {
        None => (None, None),
        Some(t) => match t.get("type").and_then(Json::as_str) {
            Some("enabled") => (Some(true), Fields(t).u64("budget_tokens")?.map(|b| b as usize)),
            Some("disabled") => (Some(false), None),
            _ => return Err(ApiError::bad("thinking.type: expected enabled or disabled").param("thinking")),
        },
    };
    let prompt = render(s, &messages, tools.as_ref().map(|t| &t.0), enable_thinking, None)?;
    // Fields the request leaves out take the model's defaults (generation_config.json).
    let d = s.engine.default_sampling.clone();
    let sampling = SamplingParams {
        temperature: f.f64_in("temperature", 0.0, 1.0)?.map_or(d.temperature, |x| x as f32),
        top_p: f.f64_in("top_p", 0.0, 1.0)?.map_or(d.top_p, |x| x as f32),
        top_k: f.u64("top_k")?.map_or(d.top_k, |x| x as usize),
        ..d
    };
    let job = GenerateRequest {
        max_tokens: reply_budget(s, prompt.len(), Some(max_tokens)),
        prompt,
        sampling,
        stop_strings: f.strings("stop_sequences")?,
        think_budget: budget.or(s.think_budget),
        split_reasoning: true,
        constraint,
        ..Default::default()
    };
    Ok((Prepared { job, tools: tools.map(|t| t.1), script_key: last_text(&messages) }, stream))
}

fn stop_reason(g: &Generation, called: bool) -> (&'static str, Json) {
    match &g.finish {
        Finish::Length | Finish::Context => ("max_tokens", Json::Null),
        Finish::StopString(s) => ("stop_sequence", Json::String(s.clone())),
        _ if called => ("tool_use", Json::Null),
        _ => ("end_turn", Json::Null),
    }
}

fn usage(g: &Generation) -> Json {
    json!({
        "input_tokens": g.prompt_tokens - g.reused_tokens,
        "cache_read_input_tokens": g.reused_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": g.completion_tokens,
    })
}

async fn handle(s: Shared, client: Client, body: &[u8]) -> ApiResult<Response> {
    let o = parse_body(body)?;
    let (p, stream) = prepare(&s, &o)?;
    let prompt_tokens = p.job.prompt.len();
    let user = match Fields(&o).object("metadata")? {
        Some(m) => Fields(m).str("user_id")?,
        None => None,
    };
    let ticket = submit(&s, &p, "/v1/messages", client.cache_scope(user))?;
    let mut relay = Relay::new(&s, p.tools.clone());
    let id = new_id("msg_");
    let model = s.model_name.clone();
    if !stream {
        let (c, g) = collect(ticket, &mut relay).await?;
        let mut content = Vec::new();
        if !c.reasoning.is_empty() {
            content.push(json!({"type": "thinking", "thinking": c.reasoning, "signature": ""}));
        }
        if !c.content.is_empty() {
            content.push(json!({"type": "text", "text": c.content}));
        }
        for (cid, name, args) in &c.calls {
            let input: Json = serde_json::from_str(args).unwrap_or(json!({}));
            content.push(json!({"type": "tool_use", "id": cid, "name": name, "input": input}));
        }
        let (reason, seq) = stop_reason(&g, !c.calls.is_empty());
        return Ok(axum::Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": seq, "usage": usage(&g),
        }))
        .into_response());
    }
    let stream = async_stream::stream! {
        let mut ticket = ticket;
        let ev = |name: &str, v: Json| Ok::<_, Infallible>(SseEvent::default().event(name).data(v.to_string()));
        yield ev("message_start", json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
        }}));
        // The open block: (index, kind) with kind "text", "thinking" or "tool_use".
        let mut open: Option<(usize, &'static str)> = None;
        let mut next = 0usize;
        let mut called = false;
        loop {
            let Some(e) = ticket.rx.recv().await else { break };
            let (events, done) = match e {
                Ev::Started | Ev::Logprob(_) => continue,
                Ev::Piece(ch, t) => (relay.piece(ch, t), None),
                Ev::Done(g) => (relay.finish(), Some(g)),
                Ev::Failed(m) => {
                    yield ev("error", ApiError::internal(m).flavor(Flavor::Anthropic).body());
                    break;
                }
            };
            for e in events {
                let (want, start, delta): (&'static str, Json, Json) = match e {
                    Event::Text(t) => ("text", json!({"type": "text", "text": ""}), json!({"type": "text_delta", "text": t})),
                    Event::Reasoning(t) => ("thinking", json!({"type": "thinking", "thinking": "", "signature": ""}), json!({"type": "thinking_delta", "thinking": t})),
                    Event::ToolCallStart { id, name, .. } => {
                        called = true;
                        if let Some((i, _)) = open.take() {
                            yield ev("content_block_stop", json!({"type": "content_block_stop", "index": i}));
                        }
                        let i = next;
                        next += 1;
                        open = Some((i, "tool_use"));
                        yield ev("content_block_start", json!({"type": "content_block_start", "index": i,
                            "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}));
                        continue;
                    }
                    Event::ToolCallArgs { delta_json, .. } => {
                        if let Some((i, "tool_use")) = open {
                            yield ev("content_block_delta", json!({"type": "content_block_delta", "index": i,
                                "delta": {"type": "input_json_delta", "partial_json": delta_json}}));
                        }
                        continue;
                    }
                    Event::ToolCallEnd { .. } => {
                        if let Some((i, _)) = open.take() {
                            yield ev("content_block_stop", json!({"type": "content_block_stop", "index": i}));
                        }
                        continue;
                    }
                };
                if open.map(|(_, k)| k) != Some(want) {
                    if let Some((i, _)) = open.take() {
                        yield ev("content_block_stop", json!({"type": "content_block_stop", "index": i}));
                    }
                    let i = next;
                    next += 1;
                    open = Some((i, want));
                    yield ev("content_block_start", json!({"type": "content_block_start", "index": i, "content_block": start}));
                }
                let i = open.map_or(0, |(i, _)| i);
                yield ev("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": delta}));
            }
            if let Some(g) = done {
                if let Some((i, _)) = open.take() {
                    yield ev("content_block_stop", json!({"type": "content_block_stop", "index": i}));
                }
                let (reason, seq) = stop_reason(&g, called);
                yield ev("message_delta", json!({"type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": usage(&g)}));
                yield ev("message_stop", json!({"type": "message_stop"}));
                break;
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}
