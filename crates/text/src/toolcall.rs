//! Streaming parser for the model's output: splits it into answer text, reasoning (`<think>`)
//! and tool calls, in the two tool-call formats of the Qwen family:
//!
//! * [`ToolFormat::QwenXml`] (Qwen3.5, Qwen3-Coder):
//!   `<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call>`.
//!   Values are raw text; they are converted to JSON by the type the tool's JSON schema gives the
//!   parameter (strings stay raw; numbers, booleans, objects and arrays are parsed), and without a
//!   schema they are parsed as JSON when they are valid JSON, else kept as strings.
//! * [`ToolFormat::HermesJson`] (Qwen3, Qwen3-Next):
//!   `<tool_call>\n{"name": NAME, "arguments": {…}}\n</tool_call>`.
//!
//! The parser accepts either body whatever the format it was built for (the format only names
//! what the template asks for). Text arrives in arbitrary chunks, tags may be split between
//! chunks; only a suffix that could be the start of a tag is held back. Text that looks like a
//! tool call but cannot be parsed is given back as [`Event::Text`], never dropped.
//!
//! Whitespace: each segment (answer text, reasoning) is trimmed at both ends, as the chat
//! templates trim `content` and `reasoning_content` when they render them back; so the newlines
//! the templates put around `<think>`, `</think>` and `<tool_call>` never show up in the events.

use std::collections::HashMap;

use rand::Rng;
use serde_json::Value as Json;

/// Tool-call syntax a chat template teaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// Qwen3.5 / Qwen3-Coder: `<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call>`.
    QwenXml,
    /// Qwen3 / Qwen3-Next (Hermes style): `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`.
    HermesJson,
}

/// The format a chat template uses: XML when its source contains `<function=` (as mlx-lm
/// decides), JSON otherwise.
pub fn detect_format(chat_template_source: &str) -> ToolFormat {
    if chat_template_source.contains("<function=") { ToolFormat::QwenXml } else { ToolFormat::HermesJson }
}

/// What the parser recognises in the generated text, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Answer text (content).
    Text(String),
    /// Thinking text (inside `<think>…</think>`).
    Reasoning(String),
    /// A tool call begins; `index` counts the calls of this response from 0.
    ToolCallStart { index: usize, id: String, name: String },
    /// More of the arguments JSON of call `index`; the deltas of one call concatenate to a JSON object.
    ToolCallArgs { index: usize, delta_json: String },
    /// Call `index` is complete.
    ToolCallEnd { index: usize },
}

/// A complete tool call, as [`collect`] assembles it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments object (a JSON string value if the deltas did not form valid JSON).
    pub arguments: Json,
}

/// Assembles events into `(content, reasoning, tool_calls)`.
pub fn collect(events: impl IntoIterator<Item = Event>) -> (String, String, Vec<ToolCall>) {
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut calls: Vec<(usize, String, String, String)> = Vec::new();
    for e in events {
        match e {
            Event::Text(t) => content.push_str(&t),
            Event::Reasoning(t) => reasoning.push_str(&t),
            Event::ToolCallStart { index, id, name } => calls.push((index, id, name, String::new())),
            Event::ToolCallArgs { index, delta_json } => {
                if let Some(c) = calls.iter_mut().find(|c| c.0 == index) {
                    c.3.push_str(&delta_json);
                }
            }
            Event::ToolCallEnd { .. } => {}
        }
    }
    let calls = calls
        .into_iter()
        .map(|(_, id, name, args)| {
            let arguments = serde_json::from_str(&args).unwrap_or(Json::String(args));
            ToolCall { id, name, arguments }
        })
        .collect();
    (content, reasoning, calls)
}

/// A fresh tool-call id: `call_` and 24 random letters and digits.
pub fn new_call_id() -> String {
    let suffix: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(24).map(char::from).collect();
    format!("call_{suffix}")
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const FUNC_OPEN: &str = "<function=";
const FUNC_CLOSE: &str = "</function>";
const PARAM_OPEN: &str = "<parameter=";
const PARAM_CLOSE: &str = "</parameter>";

/// Where the parser is inside a `<tool_call>` block.
#[derive(Debug)]
enum CallPhase {
    /// Right after `<tool_call>`: the body's kind is not known yet.
    Start,
    /// A JSON (or unrecognised) body: buffered until `</tool_call>`.
    Opaque,
    /// XML: waiting for `<function=NAME>` (or `</tool_call>` once a function was seen).
    AwaitFunction,
    /// XML: inside a function, between parameters.
    InFunction,
    /// XML: inside `<parameter=NAME>`, the value runs to `</parameter>`.
    InParam(String),
}

#[derive(Debug)]
enum Mode {
    Text,
    Reasoning,
    Call(CallPhase),
}

/// The call being streamed (XML).
#[derive(Debug)]
struct OpenCall {
    index: usize,
    name: String,
    nparams: usize,
}

/// Streaming splitter of generated text into [`Event`]s; see the module docs.
#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolFormat,
    tools: HashMap<String, Json>,
    mode: Mode,
    /// Unprocessed input.
    buf: String,
    /// Consumed text of the current `<tool_call>` block, kept until a function starts so that a
    /// malformed block can be given back as text.
    raw: String,
    /// Functions completed or started in the current `<tool_call>` block.
    block_functions: usize,
    open: Option<OpenCall>,
    next_index: usize,
    /// Strip leading whitespace of the next text/reasoning that is emitted.
    seg_start: bool,
    /// Trailing whitespace held back until non-whitespace of the same segment follows.
    pending_ws: String,
    /// `pending_ws` and `seg_start` when the current `<tool_call>` began.
    ws_before_call: String,
    seg_start_before_call: bool,
}

impl ToolCallParser {
    /// `thinking_open`: the prompt ended inside `<think>` (the output starts as reasoning).
    /// `tools_known`: (name, parameters JSON schema) of each tool offered, to type XML values.
    pub fn new(format: ToolFormat, thinking_open: bool, tools_known: Option<Vec<(String, Json)>>) -> Self {
        Self {
            format,
            tools: tools_known.unwrap_or_default().into_iter().collect(),
            mode: if thinking_open { Mode::Reasoning } else { Mode::Text },
            buf: String::new(),
            raw: String::new(),
            block_functions: 0,
            open: None,
            next_index: 0,
            seg_start: true,
            pending_ws: String::new(),
            ws_before_call: String::new(),
            seg_start_before_call: true,
        }
    }

    /// The format this parser was built for.
    pub fn format(&self) -> ToolFormat {
        self.format
    }

    /// Tool calls started so far.
    pub fn calls_started(&self) -> usize {
        self.next_index
    }

    /// Feeds more generated text; returns the events it completes.
    pub fn push(&mut self, text: &str) -> Vec<Event> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.run(&mut out, false);
        out
    }

    /// End of generation: flushes what is held back, closes an unterminated tool call.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        self.run(&mut out, true);
        out
    }

    fn run(&mut self, out: &mut Vec<Event>, last: bool) {
        while self.step(out, last) {}
        if last {
            self.pending_ws.clear();
            self.seg_start = true;
        }
    }

    /// One step of the state machine; false when it needs more input.
    fn step(&mut self, out: &mut Vec<Event>, last: bool) -> bool {
        match &self.mode {
            Mode::Text | Mode::Reasoning => {
                let reasoning = matches!(self.mode, Mode::Reasoning);
                let tags: &[&str] = if reasoning { &[THINK_CLOSE] } else { &[THINK_OPEN, CALL_OPEN, THINK_CLOSE] };
                if let Some((pos, tag)) = find_first(&self.buf, tags) {
                    let before: String = self.buf[..pos].to_string();
                    self.buf.drain(..pos + tag.len());
                    self.emit_segment(out, &before, reasoning);
                    // Kept in case the call turns out malformed and is given back as text.
                    self.ws_before_call = std::mem::take(&mut self.pending_ws);
                    self.seg_start_before_call = self.seg_start;
                    self.end_segment();
                    self.mode = match tag {
                        THINK_OPEN => Mode::Reasoning,
                        CALL_OPEN => {
                            self.raw.clear();
                            self.block_functions = 0;
                            Mode::Call(CallPhase::Start)
                        }
                        // `</think>` ends reasoning; a stray one in text is dropped.
                        _ => Mode::Text,
                    };
                    return true;
                }
                let keep = if last { 0 } else { partial_tag_suffix(&self.buf, tags) };
                let cut = self.buf.len() - keep;
                if cut > 0 {
                    let text: String = self.buf.drain(..cut).collect();
                    self.emit_segment(out, &text, reasoning);
                }
                false
            }
            Mode::Call(_) => self.step_call(out, last),
        }
    }

    fn step_call(&mut self, out: &mut Vec<Event>, last: bool) -> bool {
        let Mode::Call(phase) = &self.mode else { unreachable!() };
        match phase {
            CallPhase::Start => {
                let t = self.buf.trim_start();
                if t.is_empty() {
                    if last {
                        self.malformed(out);
                    }
                    return last;
                }
                if t.starts_with(FUNC_OPEN) {
                    self.mode = Mode::Call(CallPhase::AwaitFunction);
                    true
                } else if FUNC_OPEN.starts_with(t) && !last {
                    false
                } else {
                    self.mode = Mode::Call(CallPhase::Opaque);
                    true
                }
            }
            CallPhase::Opaque => {
                let (body, found) = match self.buf.find(CALL_CLOSE) {
                    Some(pos) => (self.buf[..pos].to_string(), true),
                    None if last => (self.buf.clone(), false),
                    None => return false,
                };
                let full = format!("{}{}", self.raw, body);
                match parse_json_call(&full) {
                    Some((name, args)) => {
                        self.buf.drain(..body.len() + if found { CALL_CLOSE.len() } else { 0 });
                        let index = self.next_index;
                        self.next_index += 1;
                        out.push(Event::ToolCallStart { index, id: new_call_id(), name });
                        out.push(Event::ToolCallArgs { index, delta_json: args });
                        out.push(Event::ToolCallEnd { index });
                        self.leave_call();
                    }
                    None => {
                        if found {
                            self.buf.drain(..body.len() + CALL_CLOSE.len());
                            self.raw.push_str(&body);
                            self.raw.push_str(CALL_CLOSE);
                        } else {
                            self.buf.drain(..body.len());
                            self.raw.push_str(&body);
                        }
                        self.malformed(out);
                    }
                }
                true
            }
            CallPhase::AwaitFunction => {
                let ws = self.buf.len() - self.buf.trim_start().len();
                if ws > 0 {
                    let w: String = self.buf.drain(..ws).collect();
                    if self.block_functions == 0 {
                        self.raw.push_str(&w);
                    }
                }
                if self.buf.starts_with(FUNC_OPEN) {
                    let Some(gt) = self.buf.find('>') else {
                        if last {
                            return self.xml_malformed();
                        }
                        return false;
                    };
                    let name = self.buf[FUNC_OPEN.len()..gt].trim().to_string();
                    if name.is_empty() || name.contains(['<', '\n']) {
                        return self.xml_malformed();
                    }
                    self.buf.drain(..gt + 1);
                    let index = self.next_index;
                    self.next_index += 1;
                    self.block_functions += 1;
                    out.push(Event::ToolCallStart { index, id: new_call_id(), name: name.clone() });
                    self.open = Some(OpenCall { index, name, nparams: 0 });
                    self.mode = Mode::Call(CallPhase::InFunction);
                    return true;
                }
                if self.buf.starts_with(CALL_CLOSE) && self.block_functions > 0 {
                    self.buf.drain(..CALL_CLOSE.len());
                    self.leave_call();
                    return true;
                }
                if self.buf.is_empty() {
                    if last && self.block_functions > 0 {
                        self.leave_call();
                    } else if last {
                        self.malformed(out);
                    }
                    return false;
                }
                let could_be_tag =
                    FUNC_OPEN.starts_with(self.buf.as_str()) || CALL_CLOSE.starts_with(self.buf.as_str());
                if could_be_tag && !last {
                    return false;
                }
                if self.block_functions > 0 {
                    // Junk between `</function>` and `</tool_call>`: dropped (the calls are out).
                    let next = after_first_char_to('<', &self.buf);
                    self.buf.drain(..next);
                    return true;
                }
                self.xml_malformed()
            }
            CallPhase::InFunction => {
                let ws = self.buf.len() - self.buf.trim_start().len();
                self.buf.drain(..ws);
                if self.buf.starts_with(PARAM_OPEN) {
                    let Some(gt) = self.buf.find('>') else {
                        if last {
                            self.close_open_call(out);
                            self.leave_call();
                            return false;
                        }
                        return false;
                    };
                    let name = self.buf[PARAM_OPEN.len()..gt].trim().to_string();
                    self.buf.drain(..gt + 1);
                    self.mode = Mode::Call(CallPhase::InParam(name));
                    return true;
                }
                if self.buf.starts_with(FUNC_CLOSE) {
                    self.buf.drain(..FUNC_CLOSE.len());
                    self.close_open_call(out);
                    self.mode = Mode::Call(CallPhase::AwaitFunction);
                    return true;
                }
                if self.buf.starts_with(CALL_CLOSE) {
                    // `</function>` missing.
                    self.close_open_call(out);
                    self.mode = Mode::Call(CallPhase::AwaitFunction);
                    return true;
                }
                if self.buf.is_empty()
                    || (!last && [PARAM_OPEN, FUNC_CLOSE, CALL_CLOSE].iter().any(|t| t.starts_with(self.buf.as_str())))
                {
                    if last {
                        self.close_open_call(out);
                        self.leave_call();
                    }
                    return false;
                }
                if last {
                    self.close_open_call(out);
                    self.buf.clear();
                    self.leave_call();
                    return false;
                }
                // Stray text inside the function: skipped up to the next tag.
                let next = after_first_char_to('<', &self.buf);
                self.buf.drain(..next);
                true
            }
            CallPhase::InParam(name) => {
                let name = name.clone();
                let ends = [PARAM_CLOSE, PARAM_OPEN, FUNC_CLOSE, CALL_CLOSE];
                let (value, consumed) = match find_first(&self.buf, &ends) {
                    Some((pos, tag)) => {
                        let extra = if tag == PARAM_CLOSE { PARAM_CLOSE.len() } else { 0 };
                        (self.buf[..pos].to_string(), pos + extra)
                    }
                    None if last => (self.buf.clone(), self.buf.len()),
                    None => return false,
                };
                self.buf.drain(..consumed);
                self.emit_param(out, &name, &value);
                self.mode = Mode::Call(CallPhase::InFunction);
                true
            }
        }
    }

    /// An XML block that never got a valid `<function=…>`: given back as text.
    fn xml_malformed(&mut self) -> bool {
        if self.block_functions > 0 {
            // A later function of the block is broken: the earlier ones stand, the rest is
            // parsed again as text.
            self.leave_call();
            return true;
        }
        self.mode = Mode::Call(CallPhase::Opaque);
        true
    }

    /// Gives back `<tool_call>` and everything consumed of the block as text.
    fn malformed(&mut self, out: &mut Vec<Event>) {
        let text = format!("{}{CALL_OPEN}{}", std::mem::take(&mut self.ws_before_call), std::mem::take(&mut self.raw));
        self.mode = Mode::Text;
        self.seg_start = self.seg_start_before_call;
        self.emit_segment(out, &text, false);
    }

    fn leave_call(&mut self) {
        self.mode = Mode::Text;
        self.raw.clear();
        self.block_functions = 0;
        self.end_segment();
    }

    fn emit_param(&mut self, out: &mut Vec<Event>, name: &str, value: &str) {
        let Some(open) = self.open.as_mut() else { return };
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        let schema = self.tools.get(&open.name).and_then(|s| s.get("properties")).and_then(|p| p.get(name));
        let v = convert_param(value, schema);
        let key = Json::String(name.to_string()).to_string();
        let sep = if open.nparams == 0 { "{" } else { "," };
        open.nparams += 1;
        out.push(Event::ToolCallArgs { index: open.index, delta_json: format!("{sep}{key}:{v}") });
    }

    fn close_open_call(&mut self, out: &mut Vec<Event>) {
        if let Some(open) = self.open.take() {
            let close = if open.nparams == 0 { "{}" } else { "}" };
            out.push(Event::ToolCallArgs { index: open.index, delta_json: close.into() });
            out.push(Event::ToolCallEnd { index: open.index });
        }
    }

    /// Emits text of the current segment with the segment's outer whitespace trimmed.
    fn emit_segment(&mut self, out: &mut Vec<Event>, text: &str, reasoning: bool) {
        let mut text = text;
        if self.seg_start {
            text = text.trim_start();
            if text.is_empty() {
                return;
            }
            self.seg_start = false;
        }
        let body = text.trim_end();
        if body.is_empty() {
            self.pending_ws.push_str(text);
            return;
        }
        let mut s = std::mem::take(&mut self.pending_ws);
        s.push_str(body);
        self.pending_ws.push_str(&text[body.len()..]);
        out.push(if reasoning { Event::Reasoning(s) } else { Event::Text(s) });
    }

    fn end_segment(&mut self) {
        self.pending_ws.clear();
        self.seg_start = true;
    }
}

/// Earliest occurrence of any of `tags` in `s`.
fn find_first<'t>(s: &str, tags: &[&'t str]) -> Option<(usize, &'t str)> {
    tags.iter().filter_map(|t| s.find(t).map(|p| (p, *t))).min_by_key(|(p, t)| (*p, std::cmp::Reverse(t.len())))
}

/// Length of the longest suffix of `s` that is a proper prefix of one of `tags`.
fn partial_tag_suffix(s: &str, tags: &[&str]) -> usize {
    let max = tags.iter().map(|t| t.len() - 1).max().unwrap_or(0).min(s.len());
    (1..=max)
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tags.iter().any(|t| t.starts_with(&s[s.len() - n..])))
        .unwrap_or(0)
}

/// Parses a Hermes-style body `{"name": …, "arguments": {…}}` into (name, arguments JSON text).
fn parse_json_call(body: &str) -> Option<(String, String)> {
    let v: Json = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Json::Null) => Json::Object(Default::default()),
        // Some models put the arguments object in a JSON string.
        Some(Json::String(s)) => match serde_json::from_str::<Json>(s) {
            Ok(o @ Json::Object(_)) => o,
            _ => return None,
        },
        Some(o @ Json::Object(_)) => o.clone(),
        Some(_) => return None,
    };
    Some((name, args.to_string()))
}

/// JSON schema type names of a property (`type` as string or list, and `anyOf`/`oneOf` members).
fn schema_types(schema: &Json) -> Vec<String> {
    let mut out = Vec::new();
    match schema.get("type") {
        Some(Json::String(s)) => out.push(s.to_lowercase()),
        Some(Json::Array(a)) => out.extend(a.iter().filter_map(Json::as_str).map(str::to_lowercase)),
        _ => {}
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Json::Array(alts)) = schema.get(key) {
            for alt in alts {
                out.extend(schema_types(alt));
            }
        }
    }
    if out.is_empty() && schema.get("enum").is_some() {
        out.push("string".into());
    }
    out
}

/// Where the next `c` after the first character of `buf` starts (the end of `buf` if none):
/// what skipping stray text up to the next tag drains. The first character may be multi-byte.
fn after_first_char_to(c: char, buf: &str) -> usize {
    let first = buf.chars().next().map_or(0, char::len_utf8);
    buf[first..].find(c).map_or(buf.len(), |p| p + first)
}

/// Converts an XML parameter value to JSON by its schema (see the module docs).
pub fn convert_param(value: &str, schema: Option<&Json>) -> Json {
    let types = schema.map(schema_types).unwrap_or_default();
    let t = value.trim();
    if types.iter().any(|x| x == "null") && t.eq_ignore_ascii_case("null") {
        return Json::Null;
    }
    let has = |name: &str| types.iter().any(|x| x == name);
    if types.is_empty()
        || !types.iter().any(|x| matches!(x.as_str(), "string" | "integer" | "number" | "boolean" | "object" | "array"))
    {
        return serde_json::from_str(t).unwrap_or_else(|_| Json::String(value.to_string()));
    }
    if has("integer") || has("number") {
        if let Ok(n) = t.parse::<i64>() {
            return Json::from(n);
        }
        if (has("number") || t.parse::<f64>().is_ok_and(|f| f.fract() == 0.0))
            && let Ok(Json::Number(n)) = serde_json::from_str::<Json>(t)
        {
            if has("number") {
                return Json::Number(n);
            }
            if let Some(f) = n.as_f64() {
                return Json::from(f as i64);
            }
        }
    }
    if has("boolean") {
        if t.eq_ignore_ascii_case("true") {
            return Json::Bool(true);
        }
        if t.eq_ignore_ascii_case("false") {
            return Json::Bool(false);
        }
    }
    if has("object") || has("array") {
        let fits = |v: &Json| (v.is_object() && has("object")) || (v.is_array() && has("array"));
        if let Some(v) = serde_json::from_str::<Json>(t).ok().filter(fits).or_else(|| python_literal(t).filter(fits)) {
            return v;
        }
    }
    if has("string") {
        return Json::String(value.to_string());
    }
    // The value does not fit its declared type: keep what it says.
    serde_json::from_str(t).unwrap_or_else(|_| Json::String(value.to_string()))
}

/// A Python literal as `str(dict)` prints it (`{'a': True, 'b': None}`), read as JSON.
fn python_literal(s: &str) -> Option<Json> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    let mut in_str: Option<char> = None;
    while let Some(c) = chars.next() {
        match in_str {
            Some(q) => match c {
                '\\' => {
                    let n = chars.next()?;
                    if n == '\'' {
                        out.push('\'');
                    } else {
                        out.push('\\');
                        out.push(n);
                    }
                }
                c if c == q => {
                    out.push('"');
                    in_str = None;
                }
                '"' => out.push_str("\\\""),
                c => out.push(c),
            },
            None => match c {
                '\'' | '"' => {
                    out.push('"');
                    in_str = Some(c);
                }
                c if c.is_ascii_alphabetic() => {
                    let mut word = String::from(c);
                    while let Some(&n) = chars.peek() {
                        if n.is_ascii_alphanumeric() || n == '_' {
                            word.push(n);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    out.push_str(match word.as_str() {
                        "True" => "true",
                        "False" => "false",
                        "None" => "null",
                        _ => return None,
                    });
                }
                c => out.push(c),
            },
        }
    }
    serde_json::from_str(&out).ok()
}
