//! Chat templates: render OpenAI-style messages into the model's prompt text.
//!
//! The goal is byte-identical output to transformers'
//! `tokenizer.apply_chat_template(messages, tools=…, tokenize=False, add_generation_prompt=…, **kwargs)`.
//! transformers renders with Python jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls) and a
//! handful of globals; minijinja is close to jinja2 but differs in the places patched here:
//! `tojson`, printing of non-strings (`True`/`None`), Python string methods, `trim`, the
//! `sequence` test, and the `{% generation %}` tag of transformers' AssistantTracker.

use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::error::{Result, TextError, jinja_message, read_file};
use crate::pyfmt;
use crate::tokenizer::TextTokenizer;

/// Name under which a single (unnamed) template is stored, as transformers does.
const DEFAULT_NAME: &str = "default";
/// transformers picks this named template when tools are passed.
const TOOL_USE_NAME: &str = "tool_use";

/// Template instructions one rendering may execute (minijinja fuel). The real Qwen templates
/// spend a few hundred per message, so this allows conversations far longer than any context
/// while a template (or input) that loops without end fails in about a second.
pub const RENDER_FUEL: u64 = 20_000_000;
/// Most bytes one rendering may produce: far more than any context holds as text.
pub const MAX_RENDER_BYTES: usize = 64 << 20;

/// A rendering's output, refused past `limit` bytes (minijinja stops at the write error).
struct BoundedOutput {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            return Err(std::io::Error::other(format!("the rendered prompt exceeds {} bytes", self.limit)));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Built-in fallback for models that ship no template: plain Qwen-style ChatML.
///
/// `enable_thinking` is deliberately ignored: the fallback is used for unknown models, and
/// appending Qwen3's empty `<think>\n\n</think>\n\n` block would inject tokens that such a model
/// never saw in training. Tools are ignored too (there is no generic way to describe them).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message.role + '\\n' + (message.content if message.content is string else '') + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Special-token attributes transformers puts into the template context (`special_tokens_map`).
const SPECIAL_TOKEN_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A compiled chat template plus the special tokens its context needs.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// (name, source) of every template; usually just `default`.
    sources: Vec<(String, String)>,
    /// Where the template came from (file path, `<string>`, `<built-in ChatML>`), for errors.
    origin: String,
    /// `bos_token`, `eos_token`, … from tokenizer_config.json, in transformers' order.
    special_tokens: Vec<(String, String)>,
    fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("names", &self.sources.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Loads the template of a model directory, in transformers' order of precedence:
    /// `chat_template.jinja`, then `chat_template.json` (`{"chat_template": …}`), then the
    /// `chat_template` key of `tokenizer_config.json`, else the built-in ChatML fallback
    /// ([`CHATML_TEMPLATE`]). Special tokens come from `tokenizer_config.json` when present.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() { Some(read_json(&config_path)?) } else { None };

        let jinja_path = dir.join("chat_template.jinja");
        let json_path = dir.join("chat_template.json");
        // `exists`, not `is_file`: a FIFO or device in the template's place is an error, not a
        // silent fall back to another template.
        let mut tpl = if jinja_path.exists() {
            let src = String::from_utf8(read_file(&jinja_path)?).map_err(|e| TextError::TemplateSyntax {
                origin: jinja_path.display().to_string(),
                message: format!("not UTF-8: {e}"),
            })?;
            Self::compile(vec![(DEFAULT_NAME.into(), src)], jinja_path.display().to_string())?
        } else if let Some(t) = Self::from_config_value(&read_json_opt(&json_path)?, &json_path)? {
            t
        } else if let Some(t) = config.as_ref().map(|c| Self::from_config_value(c, &config_path)).transpose()?.flatten()
        {
            t
        } else {
            Self::chatml()
        };
        if let Some(c) = &config {
            tpl.set_special_tokens_from_config(c);
        }
        Ok(tpl)
    }

    /// Loads the `chat_template` of a `tokenizer_config.json` file (string, or list of
    /// `{name, template}`), with its special tokens. `Ok(None)` when the file has no template.
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        let config = read_json(path)?;
        let tpl = Self::from_config_value(&config, path)?;
        Ok(tpl.map(|mut t| {
            t.set_special_tokens_from_config(&config);
            t
        }))
    }

    /// Compiles a template given as text.
    pub fn from_source(source: &str) -> Result<Self> {
        Self::compile(vec![(DEFAULT_NAME.into(), source.to_string())], "<string>".into())
    }

    /// The built-in ChatML fallback ([`CHATML_TEMPLATE`]).
    pub fn chatml() -> Self {
        let mut t = Self::compile(vec![(DEFAULT_NAME.into(), CHATML_TEMPLATE.into())], "<built-in ChatML>".into())
            .expect("built-in ChatML template compiles");
        t.fallback = true;
        t
    }

    /// Sets the special tokens (`bos_token`, `eos_token`, …) from a parsed tokenizer_config.json.
    /// Values may be strings or AddedToken objects (`{"content": …}`); null/missing are skipped,
    /// as transformers' `special_tokens_map` does.
    pub fn set_special_tokens_from_config(&mut self, config: &Json) {
        self.special_tokens = SPECIAL_TOKEN_KEYS
            .iter()
            .filter_map(|k| {
                let v = config.get(*k)?;
                let s = v.as_str().or_else(|| v.get("content").and_then(Json::as_str))?;
                Some((k.to_string(), s.to_string()))
            })
            .collect();
    }

    /// `bos_token` of tokenizer_config.json, if any (Qwen has none).
    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    /// `eos_token` of tokenizer_config.json, if any (`<|im_end|>` for Qwen3).
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    /// Any special token attribute (`pad_token`, `unk_token`, …).
    pub fn special_token(&self, key: &str) -> Option<&str> {
        self.special_tokens.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Source of the default template.
    pub fn source(&self) -> &str {
        self.sources.iter().find(|(n, _)| n == DEFAULT_NAME).or(self.sources.first()).map_or("", |(_, s)| s.as_str())
    }

    /// Where the template came from (a path, `<string>` or `<built-in ChatML>`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// True when this is the built-in ChatML fallback (the model shipped no template).
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// Renders a conversation.
    ///
    /// * `messages`: JSON array of OpenAI-style messages (normalized first, see [`normalize_messages`]).
    /// * `tools`: JSON array of tool schemas, passed to the template unchanged (`None` → `tools` is none).
    /// * `enable_thinking`: passed as the `enable_thinking` variable only when `Some`, so templates
    ///   see it as undefined otherwise, like transformers without the kwarg.
    /// * `extra`: more template variables (e.g. `reasoning_effort`); they override the special
    ///   tokens but may not redefine `messages`, `tools`, `documents` or `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
        extra: Option<&Map<String, Json>>,
    ) -> Result<String> {
        let messages = normalize_messages(messages)?;
        self.render_normalized(&messages, tools, add_generation_prompt, enable_thinking, extra)
    }

    /// Renders a conversation and tokenizes it so that only the template's own markup becomes
    /// control tokens: a special token's string inside message content, reasoning, tool-call
    /// arguments, tool results, tool definitions or `extra` values (`<|im_start|>system` in a user
    /// message) is encoded as plain text, so content cannot open or close turns. Arguments are
    /// as [`ChatTemplate::render`]'s; a conversation whose strings hold no special-token string
    /// gives exactly `tokenizer.encode(render(…))`.
    ///
    /// Non-special added tokens (Qwen's `<think>`, `<tool_call>`) stay tokens, as with Python's
    /// `split_special_tokens=True`: templates parse them out of content themselves (Qwen3 splits
    /// an assistant message at `</think>`), and they cannot change who is speaking.
    pub fn encode_chat(
        &self,
        tokenizer: &TextTokenizer,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
        extra: Option<&Map<String, Json>>,
    ) -> Result<Vec<u32>> {
        // After normalizing: a tool call's arguments string is parsed there, and its escapes
        // (`\u003c|im_start|>`) become the characters that must be marked.
        let messages = mark_strings(&normalize_messages(messages)?, tokenizer);
        let tools = tools.map(|t| mark_strings(t, tokenizer));
        let extra = extra
            .map(|e| e.iter().map(|(k, v)| (k.clone(), mark_strings(v, tokenizer))).collect::<Map<String, Json>>());
        let text =
            self.render_normalized(&messages, tools.as_ref(), add_generation_prompt, enable_thinking, extra.as_ref())?;
        tokenizer.encode_chat_prompt(&text)
    }

    fn render_normalized(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
        extra: Option<&Map<String, Json>>,
    ) -> Result<String> {
        if let Some(t) = tools
            && !(t.is_array() || t.is_null())
        {
            return Err(TextError::InvalidRequest("`tools` must be an array".into()));
        }
        let tools = tools.filter(|t| !t.is_null());

        // Same variables, in the same order, as transformers' `render(messages=…, tools=…,
        // documents=…, add_generation_prompt=…, **{**special_tokens_map, **kwargs})`.
        let mut ctx: Vec<(String, Value)> = Vec::new();
        let set = |ctx: &mut Vec<(String, Value)>, k: &str, v: Value| {
            if let Some(slot) = ctx.iter_mut().find(|(key, _)| key == k) {
                slot.1 = v;
            } else {
                ctx.push((k.to_string(), v));
            }
        };
        set(&mut ctx, "messages", json_to_value(messages));
        set(&mut ctx, "tools", tools.map_or(Value::from(()), json_to_value));
        set(&mut ctx, "documents", Value::from(()));
        set(&mut ctx, "add_generation_prompt", Value::from(add_generation_prompt));
        for (k, v) in &self.special_tokens {
            set(&mut ctx, k, Value::from(v.as_str()));
        }
        if let Some(extra) = extra {
            for (k, v) in extra {
                if matches!(k.as_str(), "messages" | "tools" | "documents" | "add_generation_prompt") {
                    return Err(TextError::InvalidRequest(format!(
                        "extra template variable `{k}` clashes with a reserved argument"
                    )));
                }
                set(&mut ctx, k, json_to_value(v));
            }
        }
        if let Some(t) = enable_thinking {
            set(&mut ctx, "enable_thinking", Value::from(t));
        }

        let name = if tools.is_some() && self.has(TOOL_USE_NAME) {
            TOOL_USE_NAME
        } else if self.has(DEFAULT_NAME) {
            DEFAULT_NAME
        } else {
            return Err(TextError::TemplateRender {
                origin: self.origin.clone(),
                message: "the template list has no `default` template".into(),
            });
        };
        let err = |e: Error| TextError::TemplateRender { origin: self.origin.clone(), message: jinja_message(&e) };
        let tpl = self.env.get_template(name).map_err(err)?;
        let mut out = BoundedOutput { buf: Vec::new(), limit: MAX_RENDER_BYTES };
        tpl.render_captured_to(Value::from_pairs(ctx), &mut out).map_err(err)?;
        // minijinja writes only `str`s, so the bytes are UTF-8.
        String::from_utf8(out.buf)
            .map_err(|e| TextError::TemplateRender { origin: self.origin.clone(), message: e.to_string() })
    }

    /// Renders a [`ChatRequest`].
    pub fn render_request(&self, req: &ChatRequest) -> Result<String> {
        let messages = serde_json::to_value(&req.messages).map_err(|e| TextError::InvalidRequest(e.to_string()))?;
        self.render(
            &messages,
            req.tools.as_ref(),
            req.add_generation_prompt,
            req.enable_thinking,
            Some(&req.chat_template_kwargs),
        )
    }

    fn has(&self, name: &str) -> bool {
        self.sources.iter().any(|(n, _)| n == name)
    }

    /// Reads `chat_template` from a tokenizer_config.json / chat_template.json value.
    fn from_config_value(config: &Json, path: &Path) -> Result<Option<Self>> {
        let origin = path.display().to_string();
        let sources = match config.get("chat_template") {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(s)) => vec![(DEFAULT_NAME.to_string(), s.clone())],
            Some(Json::Array(list)) => {
                let mut v = Vec::new();
                for item in list {
                    let name = item.get("name").and_then(Json::as_str);
                    let tpl = item.get("template").and_then(Json::as_str);
                    match (name, tpl) {
                        (Some(n), Some(t)) => v.push((n.to_string(), t.to_string())),
                        _ => {
                            return Err(TextError::InvalidJson {
                                origin,
                                message: "`chat_template` list items need string `name` and `template`".into(),
                            });
                        }
                    }
                }
                v
            }
            Some(_) => {
                return Err(TextError::InvalidJson {
                    origin,
                    message: "`chat_template` must be a string or a list of {name, template}".into(),
                });
            }
        };
        Self::compile(sources, origin).map(Some)
    }

    fn compile(sources: Vec<(String, String)>, origin: String) -> Result<Self> {
        let mut env = new_environment();
        for (name, src) in &sources {
            env.add_template_owned(name.clone(), rewrite_generation_tags(src)).map_err(|e| {
                TextError::TemplateSyntax {
                    origin: if sources.len() > 1 { format!("{origin} (template `{name}`)") } else { origin.clone() },
                    message: jinja_message(&e),
                }
            })?;
        }
        Ok(Self { env, sources, origin, special_tokens: Vec::new(), fallback: false })
    }
}

/// A request to render: what an OpenAI-style chat endpoint receives.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Tool schemas (OpenAI `[{type: "function", function: {...}}]`), passed to the template as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Json>,
    /// Append the assistant header. Defaults to true when deserialized or built with
    /// [`ChatRequest::new`] (`Default` gives false).
    #[serde(default = "default_true")]
    pub add_generation_prompt: bool,
    /// `enable_thinking` template variable; `None` leaves it undefined (the template's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_thinking: Option<bool>,
    /// More template variables, as vLLM's `chat_template_kwargs`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub chat_template_kwargs: Map<String, Json>,
}

fn default_true() -> bool {
    true
}

impl ChatRequest {
    /// A request with a generation prompt and no tools.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        Self { messages, add_generation_prompt: true, ..Self::default() }
    }
}

/// One OpenAI-style message. `content` is a string or a list of `{type: "text", text}` parts;
/// unknown fields are kept (templates may read them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Json>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

impl ChatMessage {
    /// A message with a role and text content.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: Some(Json::String(content.into())), ..Self::default() }
    }
    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: &str) -> Self {
        Self::new("assistant", content)
    }
    /// A tool result answering the call `tool_call_id`.
    pub fn tool(content: &str, tool_call_id: Option<&str>) -> Self {
        Self { tool_call_id: tool_call_id.map(str::to_string), ..Self::new("tool", content) }
    }
}

/// Normalizes OpenAI-style messages the way the template expects them:
///
/// 1. keys whose value is null are dropped (transformers 5 does this: templates handle a missing
///    key but print `None` or crash on a null);
/// 2. `content` given as a list of parts becomes the concatenation of its text parts
///    (non-text parts are an error: this engine is text-only);
/// 3. a tool call's `function.arguments` given as a JSON string is parsed into an object when it
///    is a valid JSON object (templates iterate `arguments|items` or print it with `tojson`);
/// 4. reasoning given as `thinking` or `reasoning` is copied to `reasoning_content`, and
///    `thinking` is set too, as transformers' `_alias_reasoning_fields` does.
pub fn normalize_messages(messages: &Json) -> Result<Json> {
    let list = messages.as_array().ok_or_else(|| TextError::InvalidRequest("`messages` must be an array".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let obj = m
            .as_object()
            .ok_or_else(|| TextError::InvalidRequest(format!("message {i} must be an object, got {m}")))?;
        let mut msg: Map<String, Json> =
            obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(Json::Array(parts)) = msg.get("content") {
            let text = concat_text_parts(parts, i)?;
            msg.insert("content".into(), Json::String(text));
        }
        if let Some(Json::Array(calls)) = msg.get_mut("tool_calls") {
            for call in calls.iter_mut() {
                parse_arguments(call);
            }
        }
        let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| msg.get(*k).cloned());
        if let Some(r) = reasoning {
            // Python: {"thinking": r, **message, "reasoning_content": r}. An insert on an existing
            // key keeps its position (IndexMap), which reproduces the dict-merge order exactly.
            let mut aliased = Map::new();
            aliased.insert("thinking".into(), r.clone());
            for (k, v) in msg {
                aliased.insert(k, v);
            }
            aliased.insert("reasoning_content".into(), r);
            msg = aliased;
        }
        out.push(Json::Object(msg));
    }
    Ok(Json::Array(out))
}

fn concat_text_parts(parts: &[Json], i: usize) -> Result<String> {
    let mut text = String::new();
    for p in parts {
        match p {
            Json::String(s) => text.push_str(s),
            Json::Object(o) => {
                let kind = o.get("type").and_then(Json::as_str).unwrap_or("text");
                match (kind, o.get("text").and_then(Json::as_str)) {
                    ("text", Some(t)) => text.push_str(t),
                    _ => {
                        return Err(TextError::InvalidRequest(format!(
                            "message {i}: content part of type `{kind}` is not supported (text only)"
                        )));
                    }
                }
            }
            other => {
                return Err(TextError::InvalidRequest(format!("message {i}: invalid content part {other}")));
            }
        }
    }
    Ok(text)
}

fn parse_arguments(call: &mut Json) {
    let target = if call.get("function").is_some_and(Json::is_object) { call.get_mut("function") } else { Some(call) };
    if let Some(Json::Object(f)) = target
        && let Some(Json::String(s)) = f.get("arguments")
        && let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(s)
    {
        f.insert("arguments".into(), parsed);
    }
}

/// Every string of `v` (object keys included) passed through
/// [`TextTokenizer::mark_content`].
fn mark_strings(v: &Json, tokenizer: &TextTokenizer) -> Json {
    match v {
        Json::String(s) => Json::String(tokenizer.mark_content(s)),
        Json::Array(a) => Json::Array(a.iter().map(|x| mark_strings(x, tokenizer)).collect()),
        Json::Object(o) => {
            Json::Object(o.iter().map(|(k, x)| (tokenizer.mark_content(k), mark_strings(x, tokenizer))).collect())
        }
        other => other.clone(),
    }
}

/// JSON → template value, keeping object key order (templates print dicts with `tojson`).
pub(crate) fn json_to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => Value::from(a.iter().map(json_to_value).collect::<Vec<_>>()),
        Json::Object(o) => Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), json_to_value(v)))),
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TextError::InvalidJson { origin: path.display().to_string(), message: e.to_string() })
}

fn read_json_opt(path: &Path) -> Result<Json> {
    if path.exists() { read_json(path) } else { Ok(Json::Null) }
}

/// transformers' `{% generation %}…{% endgeneration %}` (AssistantTracker) only marks spans and
/// renders its body unchanged; minijinja has no such tag, so it becomes `{% if true %}…{% endif %}`,
/// keeping any `-`/`+` whitespace control of the original tags.
fn rewrite_generation_tags(src: &str) -> String {
    if !src.contains("generation") {
        return src.to_string();
    }
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let body = inner.trim_start_matches(['-', '+']);
        let body = body.trim_end_matches(['-', '+']);
        let lead = &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()];
        let trail = &inner[inner.trim_end_matches(['-', '+']).len()..];
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(lead);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(trail);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A minijinja environment configured like transformers' jinja2 sandbox.
fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("default delimiters are valid");
    env.set_syntax(syntax);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_unknown_method_callback(python_methods);
    env.set_formatter(|out, _state, value| {
        // Safe strings and plain strings print as-is (autoescape is off); others as Python str().
        let s = pyfmt::py_str(value)?;
        out.write_str(&s).map_err(Error::from)
    });
    env.add_filter("tojson", tojson);
    env.add_filter("string", |v: Value| pyfmt::py_str(&v));
    env.add_filter("trim", |s: String, chars: Option<String>| py_strip(&s, chars.as_deref(), true, true));
    // jinja2's `sequence` test accepts anything with len() and [] (str, list, dict).
    env.add_test("sequence", |v: Value| matches!(v.kind(), ValueKind::Seq | ValueKind::Map | ValueKind::String));
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| crate::time::strftime_now(&fmt));
    env.add_function("dict", |kwargs: Kwargs| -> Result<Value, Error> {
        let keys: Vec<String> = kwargs.args().map(str::to_string).collect();
        let mut pairs = Vec::with_capacity(keys.len());
        for k in keys {
            let v: Value = kwargs.get(&k)?;
            pairs.push((k, v));
        }
        Ok(Value::from_pairs(pairs))
    });
    env
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let mut opts = pyfmt::JsonOptions::default();
    if let Some(a) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        opts.ensure_ascii = a;
    }
    let indent: Option<Value> = kwargs.get("indent")?;
    opts.indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => Some(" ".repeat(v.as_usize().unwrap_or(0))),
    };
    // json.dumps: separators default to (', ', ': ') without indent and (',', ': ') with one.
    if opts.indent.is_some() {
        opts.item_sep = ",".into();
    }
    let separators: Option<Value> = kwargs.get("separators")?;
    if let Some(seps) = separators.filter(|s| !s.is_none()) {
        let items: Vec<Value> = seps.try_iter()?.collect();
        match items.as_slice() {
            [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                opts.item_sep = a.as_str().unwrap_or_default().to_string();
                opts.key_sep = b.as_str().unwrap_or_default().to_string();
            }
            _ => {
                return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair of strings"));
            }
        }
    }
    if let Some(s) = kwargs.get::<Option<bool>>("sort_keys")? {
        opts.sort_keys = s;
    }
    kwargs.assert_all_used()?;
    Ok(Value::from(pyfmt::dumps(&value, &opts)?))
}

/// Python string methods. Delegates to minijinja-contrib's pycompat, but handles the cases where
/// it follows Rust rather than Python: `strip`/`lstrip`/`rstrip`/`split` without arguments use
/// Python's whitespace set.
fn python_methods(state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        let no_arg = args.is_empty() || (args.len() == 1 && args[0].is_none());
        match method {
            "strip" | "lstrip" | "rstrip" => {
                let chars = if no_arg {
                    None
                } else {
                    Some(args[0].as_str().ok_or_else(|| {
                        Error::new(ErrorKind::InvalidOperation, format!("{method} arg must be None or str"))
                    })?)
                };
                return Ok(Value::from(py_strip(s, chars, method != "rstrip", method != "lstrip")));
            }
            "split" if no_arg => {
                return Ok(Value::from(
                    s.split(pyfmt::is_py_space).filter(|p| !p.is_empty()).map(Value::from).collect::<Vec<_>>(),
                ));
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Python `str.strip(chars)`: `chars=None` strips Python whitespace.
fn py_strip(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let pred = |c: char| match chars {
        None => pyfmt::is_py_space(c),
        Some(set) => set.contains(c),
    };
    let mut t = s;
    if left {
        t = t.trim_start_matches(pred);
    }
    if right {
        t = t.trim_end_matches(pred);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_rewritten() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation %}b{% endgeneration -%}c{% if x %}"),
            "a{%- if true %}b{% endif -%}c{% if x %}"
        );
    }

    #[test]
    fn python_semantics() {
        let t = ChatTemplate::from_source(
            "{{ 'a</think>\\n\\nb'.split('</think>')[-1].lstrip('\\n') }}|{{ [1,2,3][::-1] }}|{{ true }}|{{ none }}|{{ ' x\\x1f '.strip() }}|{{ {'a': 1.0, 'b': [true, none]}|tojson }}|{{ {'a': 1}|tojson(indent=2) }}|{{ 'x' + 'y' }}|{{ 'ab' is sequence }}|{{ x is defined }}",
        )
        .unwrap();
        let out = t.render(&Json::Array(vec![]), None, false, None, None).unwrap();
        assert_eq!(out, "b|[3, 2, 1]|True|None|x|{\"a\": 1.0, \"b\": [true, null]}|{\n  \"a\": 1\n}|xy|True|False");
    }
}
