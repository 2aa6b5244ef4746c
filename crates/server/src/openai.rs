//! OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//!
//! `tool_choice`: `"none"` renders the prompt without the tools and parses no tool calls;
//! `"auto"` lets the model decide; `"required"` and a named function constrain the reply
//! (llguidance, [`flashmoe_text::constraint`]) to tool calls in the model's own format, to the
//! offered functions (or the named one), with arguments valid against their schemas.
//! `response_format` `json_object` and `json_schema` constrain the reply to a JSON object / to
//! the schema (`strict` true or false alike: the schema is enforced); a schema llguidance
//! cannot compile is a 400 naming the problem. The constraint starts after the thinking block.
//! `logprobs` / `top_logprobs` (0..20; completions: `logprobs` 0..20) report each generated
//! token's log-probability under the model's raw distribution (log-softmax of the logits before
//! penalties, bias, temperature and the grammar mask), thinking tokens included, streamed or not;
//! vLLM's `return_tokens_as_token_ids` names tokens `token_id:ID`. `logit_bias` is honoured.
//! A tool call the token limit cuts short is not returned as a call (non-streaming; a stream has
//! already sent its start, and ends `length`).

use crate::api::{ApiError, ApiResult, Client, Fields, missing, new_id, now_secs, parse_body};
use crate::worker::{Ev, Ticket};
use crate::{AppState, Shared};
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use flashmoe::session::{Channel, Finish, GenerateRequest, Generation, MAX_TOP_LOGPROBS};
use flashmoe_text::constraint::tool_call_grammar;
use flashmoe_text::toolcall::{Event, ToolCallParser};
use flashmoe_text::{Constraint, GrammarSpec, SamplingParams, TokenLogprob};
use serde_json::{Map, Value as Json, json};
use std::convert::Infallible;
use std::time::Duration;

/// Interval of SSE keep-alive comments (sent while a request waits in the queue or prefills).
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A chat request made ready for the worker.
pub(crate) struct Prepared {
    pub job: GenerateRequest,
    /// (name, parameters schema) of the tools offered, when tool calls are parsed.
    pub tools: Option<Vec<(String, Json)>>,
    pub script_key: String,
}

/// Generated text → events: thinking straight through, answer text through the tool-call parser
/// when tools were offered.
pub(crate) struct Relay {
    parser: Option<ToolCallParser>,
}

impl Relay {
    pub fn new(s: &AppState, tools: Option<Vec<(String, Json)>>) -> Self {
        Relay { parser: tools.map(|t| ToolCallParser::new(s.tool_format, false, Some(t))) }
    }
    pub fn piece(&mut self, ch: Channel, text: String) -> Vec<Event> {
        match (ch, &mut self.parser) {
            (Channel::Reasoning, _) => vec![Event::Reasoning(text)],
            (Channel::Content, Some(p)) => p.push(&text),
            (Channel::Content, None) => vec![Event::Text(text)],
        }
    }
    pub fn finish(&mut self) -> Vec<Event> {
        self.parser.as_mut().map(|p| p.finish()).unwrap_or_default()
    }
}

/// A whole reply, assembled from events.
#[derive(Default)]
pub(crate) struct Collected {
    pub content: String,
    pub reasoning: String,
    /// (id, name, arguments JSON text)
    pub calls: Vec<(String, String, String)>,
    /// Indices of the calls whose end tag was generated.
    ended: Vec<usize>,
    /// Calls the token limit cut short: dropped from `calls` (their arguments are incomplete).
    pub truncated_calls: usize,
}

impl Collected {
    pub fn add(&mut self, e: Event) {
        match e {
            Event::Text(t) => self.content.push_str(&t),
            Event::Reasoning(t) => self.reasoning.push_str(&t),
            Event::ToolCallStart { id, name, .. } => self.calls.push((id, name, String::new())),
            Event::ToolCallArgs { index, delta_json } => {
                if let Some(c) = self.calls.get_mut(index) {
                    c.2.push_str(&delta_json);
                }
            }
            Event::ToolCallEnd { index } => self.ended.push(index),
        }
    }
}

/// Waits for a job to end, collecting its reply.
pub(crate) async fn collect(mut ticket: Ticket, relay: &mut Relay) -> ApiResult<(Collected, Box<Generation>)> {
    let mut c = Collected::default();
    while let Some(ev) = ticket.rx.recv().await {
        match ev {
            Ev::Started => {}
            Ev::Piece(ch, t) => relay.piece(ch, t).into_iter().for_each(|e| c.add(e)),
            // The whole list is in the Generation.
            Ev::Logprob(_) => {}
            Ev::Done(g) => {
                // Calls the parser closes only now, at the end of the output, were cut short when
                // the token limit ended it: never hand those out as valid calls.
                let closed_in_output = c.ended.clone();
                relay.finish().into_iter().for_each(|e| c.add(e));
                if matches!(g.finish, Finish::Length | Finish::Context) {
                    let mut index = 0;
                    let before = c.calls.len();
                    c.calls.retain(|_| {
                        index += 1;
                        closed_in_output.contains(&(index - 1))
                    });
                    c.truncated_calls = before - c.calls.len();
                }
                return Ok((c, g));
            }
            Ev::Failed(m) => return Err(ApiError::internal(m)),
        }
    }
    Err(ApiError::internal("the engine worker stopped"))
}

pub(crate) fn check_model(s: &AppState, f: &Fields) -> ApiResult<()> {
    let model = f.req_str("model")?;
    if model != s.model_name && !s.accept_any_model {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist; this server serves `{}`.", s.model_name),
        )
        .param("model")
        .code("model_not_found"));
    }
    Ok(())
}

/// Renders messages with the model's template and tokenizes (special-token strings in content are
/// plain text: a message cannot forge a turn); a prompt that leaves no room in the context is a 400.
pub(crate) fn render(
    s: &AppState,
    messages: &Json,
    tools: Option<&Json>,
    enable_thinking: Option<bool>,
    kwargs: Option<&Map<String, Json>>,
) -> ApiResult<Vec<u32>> {
    let ids = s
        .engine
        .encode_chat(messages, tools, enable_thinking, kwargs)
        .map_err(|e| ApiError::bad(format!("The chat template could not render the request: {e}")).param("messages"))?;
    check_context(s, ids.len())?;
    Ok(ids)
}

pub(crate) fn tokenize(s: &AppState, text: &str) -> ApiResult<Vec<u32>> {
    let ids = s.engine.encode(text).map_err(|e| ApiError::bad(format!("tokenizing the prompt: {e}")))?;
    check_context(s, ids.len())?;
    Ok(ids)
}

fn check_context(s: &AppState, n: usize) -> ApiResult<()> {
    if n == 0 {
        return Err(ApiError::bad("The prompt is empty.").param("messages"));
    }
    if n >= s.max_context {
        return Err(ApiError::bad(format!(
            "This model's maximum context length is {} tokens. However, your messages resulted in {n} tokens, \
             which leaves no room for a reply. Please reduce the length of the messages.",
            s.max_context
        ))
        .param("messages")
        .code("context_length_exceeded"));
    }
    Ok(())
}

/// Reply tokens of a chat completion that sets no `max_tokens`: a bound on a reply that never
/// emits a stop token (which would otherwise run until the context is full), large enough for
/// a long answer with its thinking. The reply ends with finish_reason `length` when it is reached.
pub const DEFAULT_MAX_TOKENS: usize = 4096;

/// Tokens the reply may use: what the request asks (else [`DEFAULT_MAX_TOKENS`]), at most what
/// the context leaves.
pub(crate) fn reply_budget(s: &AppState, prompt_len: usize, asked: Option<usize>) -> usize {
    let room = s.max_context - prompt_len;
    asked.unwrap_or(DEFAULT_MAX_TOKENS).min(room)
}

/// Sampling fields shared by the OpenAI endpoints (and their common extensions); a field the
/// request leaves out takes the model's default (its generation_config.json, else greedy).
fn sampling(s: &AppState, f: &Fields) -> ApiResult<SamplingParams> {
    let d = s.engine.default_sampling.clone();
    Ok(SamplingParams {
        temperature: f.f64_in("temperature", 0.0, 2.0)?.map_or(d.temperature, |x| x as f32),
        top_p: f.f64_in("top_p", 0.0, 1.0)?.map_or(d.top_p, |x| x as f32),
        top_k: f.u64("top_k")?.map_or(d.top_k, |x| x as usize),
        min_p: f.f64_in("min_p", 0.0, 1.0)?.map_or(d.min_p, |x| x as f32),
        repetition_penalty: f.f64_positive("repetition_penalty", 10.0)?.map_or(d.repetition_penalty, |x| x as f32),
        presence_penalty: f.f64_in("presence_penalty", -2.0, 2.0)?.map_or(d.presence_penalty, |x| x as f32),
        frequency_penalty: f.f64_in("frequency_penalty", -2.0, 2.0)?.map_or(d.frequency_penalty, |x| x as f32),
        seed: f.seed("seed")?.or(d.seed),
        logit_bias: logit_bias(s, f)?,
    })
}

/// Compiles a grammar for one request; what llguidance cannot compile is a 400 on `param`.
pub(crate) fn compile(s: &AppState, spec: &GrammarSpec, param: &str, what: &str) -> ApiResult<Constraint> {
    let grammars = s.engine.grammars().map_err(|e| ApiError::internal(e.to_string()))?;
    grammars.compile(spec).map_err(|e| {
        ApiError::bad(format!("Invalid '{param}': {what} cannot be used for constrained decoding: {e}"))
            .param(param)
            .code("invalid_value")
    })
}

/// A reply forced to be tool calls: to `only` when named (it must be one of `tools`), else to
/// any of `tools`; several calls when `parallel`, else exactly one. `param` names the field
/// that asked (for errors).
pub(crate) fn forced_tool_call(
    s: &AppState,
    tools: Option<&Vec<(String, Json)>>,
    only: Option<&str>,
    parallel: bool,
    param: &str,
) -> ApiResult<Constraint> {
    let tools = tools.filter(|t| !t.is_empty()).ok_or_else(|| {
        ApiError::bad(format!("'{param}' forces a tool call, but the request offers no tools.")).param(param)
    })?;
    let chosen: Vec<(String, Json)> = match only {
        Some(name) => {
            let t = tools.iter().find(|(n, _)| n == name).ok_or_else(|| {
                ApiError::bad(format!("'{param}' names the function `{name}`, which is not among the tools offered."))
                    .param(param)
            })?;
            vec![t.clone()]
        }
        None => tools.clone(),
    };
    let grammar = tool_call_grammar(s.tool_format, &chosen, parallel).map_err(|e| ApiError::bad(e).param(param))?;
    compile(s, &GrammarSpec::Lark(grammar), param, "the tools' parameter schemas")
}

/// OpenAI `response_format`: `text` (or absent) → none; `json_object` → any JSON object;
/// `json_schema` → that schema (a missing `schema` means any JSON value).
fn response_format(s: &AppState, f: &Fields) -> ApiResult<Option<Constraint>> {
    let o = match f.get("response_format") {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::Object(o)) => o,
        Some(_) => return Err(ApiError::bad("'response_format' must be an object.").param("response_format")),
    };
    let spec = match o.get("type").and_then(Json::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => GrammarSpec::JsonObject,
        Some("json_schema") => {
            let js =
                o.get("json_schema").and_then(Json::as_object).ok_or_else(|| missing("response_format.json_schema"))?;
            if let Some(strict) = js.get("strict").filter(|v| !v.is_null() && !v.is_boolean()) {
                return Err(ApiError::bad(format!(
                    "'response_format.json_schema.strict' must be a boolean, got {strict}."
                ))
                .param("response_format.json_schema.strict"));
            }
            match js.get("schema") {
                None | Some(Json::Null) => GrammarSpec::JsonSchema(Json::Bool(true)),
                Some(schema @ (Json::Object(_) | Json::Bool(_))) => GrammarSpec::JsonSchema(schema.clone()),
                Some(_) => {
                    return Err(ApiError::bad("'response_format.json_schema.schema' must be a JSON schema object.")
                        .param("response_format.json_schema.schema"));
                }
            }
        }
        other => {
            return Err(ApiError::bad(format!(
                "Invalid 'response_format.type': {} (expected text, json_object or json_schema).",
                other.map_or("missing".to_string(), |t| format!("`{t}`"))
            ))
            .param("response_format.type"));
        }
    };
    let param = match spec {
        GrammarSpec::JsonSchema(_) => "response_format.json_schema.schema",
        _ => "response_format",
    };
    compile(s, &spec, param, "this JSON schema").map(Some)
}

/// Chat `logprobs` (bool) and `top_logprobs` (0..20, needs `logprobs`): the count of
/// alternatives per token, `None` when no logprobs are asked.
fn chat_logprobs(f: &Fields) -> ApiResult<Option<usize>> {
    let top = match f.get("top_logprobs") {
        None | Some(Json::Null) => None,
        Some(v) => Some(v.as_u64().filter(|&n| n as usize <= MAX_TOP_LOGPROBS).ok_or_else(|| {
            ApiError::bad(format!("Invalid 'top_logprobs': {v} (expected an integer from 0 to {MAX_TOP_LOGPROBS})."))
                .param("top_logprobs")
        })? as usize),
    };
    match (f.bool("logprobs")?.unwrap_or(false), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(_)) => Err(ApiError::bad("'top_logprobs' needs 'logprobs' set to true.").param("top_logprobs")),
        (false, None) => Ok(None),
    }
}

/// How tokens are named in logprobs: their text (bytes shown lossily), or vLLM's
/// `token_id:ID` when the request sets `return_tokens_as_token_ids`.
#[derive(Clone)]
pub(crate) struct TokenNames {
    s: Shared,
    as_ids: bool,
}

impl TokenNames {
    fn bytes(&self, id: u32) -> Vec<u8> {
        self.s.engine.grammars().map(|g| g.token_bytes(id)).unwrap_or_default()
    }
    fn name(&self, id: u32) -> String {
        if self.as_ids { format!("token_id:{id}") } else { String::from_utf8_lossy(&self.bytes(id)).into_owned() }
    }
    /// One entry of a chat `logprobs.content` list.
    fn chat_entry(&self, lp: &TokenLogprob) -> Json {
        let one = |id: u32, logprob: f32| json!({"token": self.name(id), "logprob": logprob, "bytes": self.bytes(id)});
        let mut e = one(lp.id, lp.logprob);
        e["top_logprobs"] = lp.top.iter().map(|&(id, l)| one(id, l)).collect();
        e
    }
    fn chat(&self, lps: &[TokenLogprob]) -> Json {
        json!({"content": lps.iter().map(|l| self.chat_entry(l)).collect::<Vec<_>>(), "refusal": null})
    }
    /// The legacy completions shape; `offset` is the text offset of the first token.
    fn completion(&self, lps: &[TokenLogprob], mut offset: usize) -> Json {
        let mut tokens = Vec::new();
        let mut token_logprobs = Vec::new();
        let mut top = Vec::new();
        let mut text_offset = Vec::new();
        for lp in lps {
            tokens.push(Json::String(self.name(lp.id)));
            token_logprobs.push(json!(lp.logprob));
            let alts: Map<String, Json> = lp.top.iter().map(|&(id, l)| (self.name(id), json!(l))).collect();
            top.push(Json::Object(alts));
            text_offset.push(json!(offset));
            offset += String::from_utf8_lossy(&self.bytes(lp.id)).len();
        }
        json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset})
    }
}

pub(crate) fn token_names(s: &Shared, f: &Fields) -> ApiResult<TokenNames> {
    Ok(TokenNames { s: s.clone(), as_ids: f.bool("return_tokens_as_token_ids")?.unwrap_or(false) })
}

/// OpenAI `logit_bias`: {"token id": bias in [-100, 100]}, added to the logits before sampling.
fn logit_bias(s: &AppState, f: &Fields) -> ApiResult<Vec<(u32, f32)>> {
    let Some(map) = f.object("logit_bias")? else { return Ok(Vec::new()) };
    let vocab = s.engine.model.config.vocab_size;
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let bad = |why: &str| ApiError::bad(format!("Invalid 'logit_bias' entry `{k}`: {why}.")).param("logit_bias");
        let id: u32 = k.parse().map_err(|_| bad("keys are token ids"))?;
        if id as usize >= vocab {
            return Err(bad(&format!("the vocabulary has {vocab} tokens")));
        }
        let b = v
            .as_f64()
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| bad("a bias is a number in [-100, 100]"))?;
        out.push((id, b as f32));
    }
    Ok(out)
}

fn check_n(f: &Fields) -> ApiResult<()> {
    if f.u64("n")?.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("Only n=1 is supported.").param("n").code("unsupported_value"));
    }
    Ok(())
}

/// OpenAI messages, checked and made safe for templates (missing content → "", `developer` →
/// `system`).
fn check_messages(msgs: &[Json]) -> ApiResult<Json> {
    if msgs.is_empty() {
        return Err(ApiError::bad("'messages' must contain at least one message.").param("messages"));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let p = |k: &str| format!("messages[{i}].{k}");
        let o = m.as_object().ok_or_else(|| {
            ApiError::bad(format!("Invalid type for 'messages[{i}]': expected an object."))
                .param(format!("messages[{i}]"))
        })?;
        let f = Fields(o);
        let role = f.str("role").map_err(|e| e.param(p("role")))?.ok_or_else(|| missing(&p("role")))?;
        let mut msg = o.clone();
        match role {
            "system" | "user" | "assistant" | "tool" => {}
            "developer" => {
                msg.insert("role".into(), "system".into());
            }
            other => {
                return Err(ApiError::bad(format!(
                    "Invalid value for 'messages[{i}].role': `{other}` (expected system, developer, user, assistant or tool)."
                ))
                .param(p("role")));
            }
        }
        match o.get("content") {
            None | Some(Json::Null) => {
                if role != "assistant" {
                    return Err(missing(&p("content")));
                }
                msg.insert("content".into(), Json::String(String::new()));
            }
            Some(Json::String(_)) | Some(Json::Array(_)) => {}
            Some(v) => {
                return Err(ApiError::bad(format!(
                    "Invalid type for '{}': expected a string or an array of content parts, but got {}.",
                    p("content"),
                    crate::api::kind(v)
                ))
                .param(p("content")));
            }
        }
        if let Some(calls) = Fields(o).array("tool_calls").map_err(|e| e.param(p("tool_calls")))? {
            for (j, c) in calls.iter().enumerate() {
                let name = c.get("function").and_then(|f| f.get("name")).and_then(Json::as_str);
                if name.is_none() {
                    return Err(missing(&format!("messages[{i}].tool_calls[{j}].function.name")));
                }
            }
        }
        out.push(Json::Object(msg));
    }
    Ok(Json::Array(out))
}

/// OpenAI `tools`: checked; returns the (name, parameters) list.
pub(crate) fn check_tools(tools: &[Json], param: &str) -> ApiResult<Vec<(String, Json)>> {
    let mut out = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let func =
            t.get("function").and_then(Json::as_object).ok_or_else(|| missing(&format!("{param}[{i}].function")))?;
        let name =
            func.get("name").and_then(Json::as_str).ok_or_else(|| missing(&format!("{param}[{i}].function.name")))?;
        out.push((name.to_string(), func.get("parameters").cloned().unwrap_or(json!({}))));
    }
    Ok(out)
}

/// The last message's text: what scripted replies are matched against.
pub(crate) fn last_text(messages: &Json) -> String {
    let Some(last) = messages.as_array().and_then(|a| a.last()) else { return String::new() };
    match last.get("content") {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Json::as_str).or(p.as_str())).collect()
        }
        _ => String::new(),
    }
}

pub(crate) fn prepare_chat(s: &AppState, o: &Map<String, Json>) -> ApiResult<(Prepared, bool, bool)> {
    let f = Fields(o);
    check_model(s, &f)?;
    let msgs = f.array("messages")?.ok_or_else(|| missing("messages"))?;
    let messages = check_messages(msgs)?;
    check_n(&f)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        Some(so) => {
            Fields(so).bool("include_usage").map_err(|e| e.param("stream_options.include_usage"))?.unwrap_or(false)
        }
        None => false,
    };
    // (forced, named function) from tool_choice.
    let (tool_choice_none, forced, named) = match f.get("tool_choice") {
        None | Some(Json::Null) => (false, false, None),
        Some(Json::String(c)) if matches!(c.as_str(), "none" | "auto") => (c == "none", false, None),
        Some(Json::String(c)) if c == "required" => (false, true, None),
        Some(Json::Object(tc)) => {
            let name = tc.get("function").and_then(|f| f.get("name")).and_then(Json::as_str);
            match (tc.get("type").and_then(Json::as_str), name) {
                (Some("function"), Some(n)) => (false, true, Some(n.to_string())),
                _ => {
                    return Err(ApiError::bad(
                        "Invalid 'tool_choice': a named choice is {\"type\": \"function\", \"function\": {\"name\": NAME}}.",
                    )
                    .param("tool_choice"));
                }
            }
        }
        Some(v) => {
            return Err(ApiError::bad(format!(
                "Invalid value for 'tool_choice': {v} (expected \"none\", \"auto\", \"required\" or a function)."
            ))
            .param("tool_choice"));
        }
    };
    let tools_json = f.array("tools")?.filter(|t| !t.is_empty() && !tool_choice_none);
    let tools = tools_json.map(|t| check_tools(t, "tools")).transpose()?;
    let mut constraint = response_format(s, &f)?;
    if forced {
        if constraint.is_some() {
            return Err(ApiError::bad(
                "A forced tool call ('tool_choice') and a JSON 'response_format' cannot be combined.",
            )
            .param("response_format"));
        }
        // A named function is one call to it (as OpenAI does); "required" allows parallel calls
        // unless `parallel_tool_calls` is false.
        let parallel = named.is_none() && f.bool("parallel_tool_calls")?.unwrap_or(true);
        constraint = Some(forced_tool_call(s, tools.as_ref(), named.as_deref(), parallel, "tool_choice")?);
    }
    let logprobs = chat_logprobs(&f)?;
    let kwargs = f.object("chat_template_kwargs")?;
    let enable_thinking = match kwargs.and_then(|k| k.get("enable_thinking")) {
        Some(v) => Some(v.as_bool().ok_or_else(|| {
            ApiError::bad("'chat_template_kwargs.enable_thinking' must be a boolean.").param("chat_template_kwargs")
        })?),
        None => f.bool("enable_thinking")?,
    };
    let mut extra = kwargs.cloned().unwrap_or_default();
    extra.remove("enable_thinking");
    let tools_value = tools_json.map(|t| Json::Array(t.clone()));
    let prompt = render(s, &messages, tools_value.as_ref(), enable_thinking, Some(&extra))?;
    let asked = match f.count("max_completion_tokens")? {
        Some(n) => Some(n),
        None => f.count("max_tokens")?,
    };
    let stop = f.strings("stop")?;
    let job = GenerateRequest {
        max_tokens: reply_budget(s, prompt.len(), asked),
        prompt,
        sampling: sampling(s, &f)?,
        stop_strings: stop,
        think_budget: f.u64("think_budget")?.map(|v| v as usize).or(s.think_budget),
        split_reasoning: true,
        constraint,
        logprobs,
        ..Default::default()
    };
    Ok((Prepared { job, tools, script_key: last_text(&messages) }, stream, include_usage))
}

/// Queues a job, its saved states scoped to `scope` ([`Client::cache_scope`]).
pub(crate) fn submit(s: &AppState, p: &Prepared, endpoint: &'static str, scope: String) -> ApiResult<Ticket> {
    let job = GenerateRequest { cache_scope: scope, ..p.job.clone() };
    s.queue.submit(job, p.script_key.clone(), endpoint).map_err(|e| ApiError::internal(e.to_string()))
}

fn usage(g: &Generation) -> Json {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "total_tokens": g.prompt_tokens + g.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": g.reused_tokens},
    })
}

fn finish_reason(g: &Generation, called: bool) -> &'static str {
    match g.finish {
        Finish::Length | Finish::Context => "length",
        _ if called => "tool_calls",
        _ => "stop",
    }
}

pub async fn chat_completions(State(s): State<Shared>, client: Option<Extension<Client>>, body: Bytes) -> Response {
    match chat(s, client.map(|c| c.0).unwrap_or_default(), &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(s: Shared, client: Client, body: &[u8]) -> ApiResult<Response> {
    let o = parse_body(body)?;
    let (p, stream, include_usage) = prepare_chat(&s, &o)?;
    let names = token_names(&s, &Fields(&o))?;
    let with_logprobs = p.job.logprobs.is_some();
    let scope = client.cache_scope(Fields(&o).str("user")?);
    let ticket = submit(&s, &p, "/v1/chat/completions", scope)?;
    let mut relay = Relay::new(&s, p.tools.clone());
    let id = new_id("chatcmpl-");
    let created = now_secs();
    let model = s.model_name.clone();
    if !stream {
        let (c, g) = collect(ticket, &mut relay).await?;
        let mut msg = Map::new();
        msg.insert("role".into(), "assistant".into());
        let content = if c.content.is_empty() && !c.calls.is_empty() { Json::Null } else { Json::String(c.content) };
        msg.insert("content".into(), content);
        if !c.reasoning.is_empty() {
            msg.insert("reasoning_content".into(), Json::String(c.reasoning));
        }
        if !c.calls.is_empty() {
            let calls: Vec<Json> = c
                .calls
                .iter()
                .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
                .collect();
            msg.insert("tool_calls".into(), Json::Array(calls));
        }
        let logprobs = if with_logprobs { names.chat(&g.logprobs) } else { Json::Null };
        return Ok(axum::Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "flashmoe",
            "choices": [{"index": 0, "message": msg, "logprobs": logprobs, "finish_reason": finish_reason(&g, !c.calls.is_empty())}],
            "usage": usage(&g),
        }))
        .into_response());
    }
    let chunk = move |delta: Json, logprobs: Json, finish: Option<&str>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "flashmoe",
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Json::Null;
        }
        c
    };
    let stream = async_stream::stream! {
        let mut ticket = ticket;
        let data = |v: Json| Ok::<_, Infallible>(SseEvent::default().data(v.to_string()));
        yield data(chunk(json!({"role": "assistant", "content": ""}), Json::Null, None));
        let mut called = false;
        // Logprobs of tokens whose text has not been sent yet: they ride on the next chunk.
        let mut pending: Vec<TokenLogprob> = Vec::new();
        loop {
            let Some(ev) = ticket.rx.recv().await else { break };
            let (events, done) = match ev {
                Ev::Started => continue,
                Ev::Logprob(lp) => {
                    pending.push(lp);
                    continue;
                }
                Ev::Piece(ch, t) => (relay.piece(ch, t), None),
                Ev::Done(g) => (relay.finish(), Some(g)),
                Ev::Failed(m) => {
                    yield data(ApiError::internal(m).body());
                    break;
                }
            };
            for e in events {
                let delta = match e {
                    Event::Text(t) => json!({"content": t}),
                    Event::Reasoning(t) => json!({"reasoning_content": t}),
                    Event::ToolCallStart { index, id, name } => {
                        called = true;
                        json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]})
                    }
                    Event::ToolCallArgs { index, delta_json } => json!({"tool_calls": [{"index": index, "function": {"arguments": delta_json}}]}),
                    Event::ToolCallEnd { .. } => continue,
                };
                let lps = if with_logprobs { names.chat(&std::mem::take(&mut pending)) } else { Json::Null };
                yield data(chunk(delta, lps, None));
            }
            if let Some(g) = done {
                if with_logprobs && !pending.is_empty() {
                    // Tokens that produced no text of their own (held back, or cut by a stop string).
                    yield data(chunk(json!({}), names.chat(&std::mem::take(&mut pending)), None));
                }
                let mut last = chunk(json!({}), Json::Null, Some(finish_reason(&g, called)));
                if include_usage {
                    last["usage"] = Json::Null;
                }
                yield data(last);
                if include_usage {
                    let mut u = chunk(json!({}), Json::Null, None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&g);
                    yield data(u);
                }
                break;
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

pub async fn completions(State(s): State<Shared>, client: Option<Extension<Client>>, body: Bytes) -> Response {
    match completion(s, client.map(|c| c.0).unwrap_or_default(), &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// A legacy completion request, validated and tokenized: (job, stream, include_usage, logprobs
/// alternatives, token naming).
pub(crate) type PreparedCompletion = (Prepared, bool, bool, Option<usize>, TokenNames);

pub(crate) fn prepare_completion(s: &Shared, o: &Map<String, Json>) -> ApiResult<PreparedCompletion> {
    let f = Fields(o);
    check_model(s, &f)?;
    check_n(&f)?;
    if f.bool("echo")? == Some(true) {
        return Err(ApiError::bad("'echo' is not supported.").param("echo").code("unsupported_value"));
    }
    let bad_prompt = || {
        ApiError::bad("'prompt' must be a string, an array of one string, or an array of token ids.").param("prompt")
    };
    let prompt = match f.get("prompt").ok_or_else(|| missing("prompt"))? {
        Json::String(t) => tokenize(s, t)?,
        Json::Array(a) if a.len() == 1 && a[0].is_string() => tokenize(s, a[0].as_str().unwrap_or_default())?,
        Json::Array(a) if !a.is_empty() && a.iter().all(|x| x.is_u64()) => {
            let ids: Vec<u32> = a.iter().filter_map(Json::as_u64).map(|x| x as u32).collect();
            let vocab = s.engine.model.config.vocab_size;
            if ids.iter().any(|&i| i as usize >= vocab) {
                return Err(
                    ApiError::bad(format!("token ids must be below the vocabulary size {vocab}")).param("prompt")
                );
            }
            check_context(s, ids.len())?;
            ids
        }
        _ => return Err(bad_prompt()),
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        Some(so) => Fields(so).bool("include_usage")?.unwrap_or(false),
        None => false,
    };
    // The legacy endpoint's default is 16 tokens.
    let asked = f.count("max_tokens")?.unwrap_or(16);
    // Legacy `logprobs`: the number of alternatives per token (OpenAI allows 5; vLLM, as here, 20).
    let logprobs = match f.get("logprobs") {
        None | Some(Json::Null) => None,
        Some(v) => Some(v.as_u64().filter(|&n| n as usize <= MAX_TOP_LOGPROBS).ok_or_else(|| {
            ApiError::bad(format!("Invalid 'logprobs': {v} (expected an integer from 0 to {MAX_TOP_LOGPROBS})."))
                .param("logprobs")
        })? as usize),
    };
    let names = token_names(s, &f)?;
    let job = GenerateRequest {
        max_tokens: reply_budget(s, prompt.len(), Some(asked)),
        prompt,
        sampling: sampling(s, &f)?,
        stop_strings: f.strings("stop")?,
        split_reasoning: false,
        logprobs,
        ..Default::default()
    };
    let script_key = match f.get("prompt") {
        Some(Json::String(t)) => t.clone(),
        _ => String::new(),
    };
    f.str("user")?;
    Ok((Prepared { job, tools: None, script_key }, stream, include_usage, logprobs, names))
}

async fn completion(s: Shared, client: Client, body: &[u8]) -> ApiResult<Response> {
    let o = parse_body(body)?;
    let (p, stream, include_usage, logprobs, names) = prepare_completion(&s, &o)?;
    let ticket = submit(&s, &p, "/v1/completions", client.cache_scope(Fields(&o).str("user")?))?;
    let mut relay = Relay::new(&s, None);
    let id = new_id("cmpl-");
    let created = now_secs();
    let model = s.model_name.clone();
    let finish = |g: &Generation| finish_reason(g, false);
    if !stream {
        let (c, g) = collect(ticket, &mut relay).await?;
        return Ok(axum::Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": c.content, "index": 0, "logprobs": logprobs.map(|_| names.completion(&g.logprobs, 0)), "finish_reason": finish(&g)}],
            "usage": usage(&g),
        }))
        .into_response());
    }
    let chunk = move |text: &str, logprobs: Json, fin: Option<&str>| {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": fin}],
        })
    };
    let stream = async_stream::stream! {
        let mut ticket = ticket;
        let data = |v: Json| Ok::<_, Infallible>(SseEvent::default().data(v.to_string()));
        // Logprobs of tokens whose text has not been sent yet, and the text offset reached.
        let mut pending: Vec<TokenLogprob> = Vec::new();
        let mut offset = 0usize;
        let take = |pending: &mut Vec<TokenLogprob>, offset: usize| match logprobs {
            Some(_) => names.completion(&std::mem::take(pending), offset),
            None => Json::Null,
        };
        while let Some(ev) = ticket.rx.recv().await {
            match ev {
                Ev::Started => {}
                Ev::Logprob(lp) => pending.push(lp),
                Ev::Piece(_, t) => {
                    let lps = take(&mut pending, offset);
                    offset += t.len();
                    yield data(chunk(&t, lps, None));
                }
                Ev::Done(g) => {
                    let lps = if pending.is_empty() { Json::Null } else { take(&mut pending, offset) };
                    yield data(chunk("", lps, Some(finish(&g))));
                    if include_usage {
                        let mut u = chunk("", Json::Null, None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(&g);
                        yield data(u);
                    }
                    break;
                }
                Ev::Failed(m) => {
                    yield data(ApiError::internal(m).body());
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

fn model_card(s: &AppState) -> Json {
    json!({
        "id": s.model_name,
        "object": "model",
        "created": s.created,
        "owned_by": "flashmoe",
        "max_model_len": s.max_context,
    })
}

pub async fn models(State(s): State<Shared>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_card(&s)]})).into_response()
}

pub async fn model(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    if id != s.model_name && !s.accept_any_model {
        return ApiError::new(StatusCode::NOT_FOUND, format!("The model `{id}` does not exist."))
            .param("model")
            .code("model_not_found")
            .into_response();
    }
    axum::Json(model_card(&s)).into_response()
}
