//! Grammar-constrained decoding with [`llguidance`]: JSON output, a JSON schema, or a Lark
//! grammar (forced tool calls) restrict which tokens the sampler may pick.
//!
//! * [`Grammars`] is built once per tokenizer (the token trie of the whole vocabulary; about a
//!   second for a 248k vocabulary) and compiles a [`GrammarSpec`] into a [`Constraint`].
//! * A [`Constraint`] belongs to one generation: before each sampling step
//!   [`Constraint::mask_logits`] sets every token the grammar forbids to -inf (so penalties,
//!   temperature and the top-k/top-p filters then work on the allowed tokens only), and
//!   [`Constraint::accept`] advances it with the token that was picked. It is finished when the
//!   grammar can take nothing more.
//!
//! The tokenizer reaches llguidance through `toktrie_hf_tokenizers`, llguidance's own bridge to
//! HF tokenizers; our `tokenizers` version differs from the bridge's, so it is handed the
//! tokenizer's JSON text rather than the object.

use crate::tokenizer::TextTokenizer;
use crate::toolcall::ToolFormat;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value as Json, json};
use std::sync::Arc;
use std::time::Instant;
use toktrie::TokEnv;

/// What a reply must match.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this schema (OpenAI `json_schema`).
    JsonSchema(Json),
    /// A grammar in llguidance's Lark syntax (forced tool calls).
    Lark(String),
}

/// Layout the JSON grammars impose: one space after `:` and `,`, no other whitespace. A small
/// model given free whitespace can emit newlines forever; this keeps every reply parseable by
/// `json.loads` and short.
fn json_layout() -> Json {
    json!({"whitespace_flexible": false, "key_separator": ": ", "item_separator": ", "})
}

impl GrammarSpec {
    fn to_llguidance(&self) -> Result<TopLevelGrammar, String> {
        let with_layout = |schema: &Json| -> Result<Json, String> {
            let mut s = schema.clone();
            match &mut s {
                Json::Object(o) => {
                    o.entry("x-guidance").or_insert_with(json_layout);
                }
                // `true` / `false` are valid schemas; wrap them so the layout can ride along.
                Json::Bool(_) => s = json!({"allOf": [s], "x-guidance": json_layout()}),
                other => return Err(format!("a JSON schema must be an object or a boolean, got {other}")),
            }
            Ok(s)
        };
        Ok(match self {
            GrammarSpec::JsonObject => TopLevelGrammar::from_json_schema(with_layout(&json!({"type": "object"}))?),
            GrammarSpec::JsonSchema(s) => TopLevelGrammar::from_json_schema(with_layout(s)?),
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// The compiler of grammars for one tokenizer (shared by every request).
pub struct Grammars {
    factory: ParserFactory,
    env: TokEnv,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.env.tok_trie().vocab_size()).finish_non_exhaustive()
    }
}

impl Grammars {
    /// Builds the token trie of `tokenizer`, padded to `vocab_size` (the model's logit count,
    /// which may exceed the tokenizer's), with `stop_ids` as the end-of-sequence tokens (the
    /// grammar allows them where the reply may end).
    pub fn new(tokenizer: &TextTokenizer, vocab_size: usize, stop_ids: &[u32]) -> Result<Self, String> {
        let json = tokenizer.inner().to_string(false).map_err(|e| format!("serializing the tokenizer: {e}"))?;
        let mut bt = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())
            .map_err(|e| format!("building the token trie: {e}"))?;
        let n = vocab_size.max(tokenizer.vocab_size());
        let stops: Vec<u32> = stop_ids.iter().copied().filter(|&s| (s as usize) < tokenizer.vocab_size()).collect();
        if !stops.is_empty() {
            bt.set_eos_tokens(&stops);
        }
        let env = bt.into_tok_env(Some(n)).map_err(|e| format!("building the token trie: {e}"))?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("starting llguidance: {e}"))?;
        // Grammar problems are returned as errors; nothing goes to stderr behind the server's logs.
        factory.quiet();
        Ok(Grammars { factory, env })
    }

    /// Compiles `spec`; an error names what llguidance could not compile (unsupported schema
    /// keyword, unsatisfiable schema, grammar syntax).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let parser = self.factory.create_parser(spec.to_llguidance()?).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint { matcher: Arc::new(std::sync::Mutex::new(matcher)), mask_secs: 0.0, steps: 0 })
    }

    /// The bytes token `id` stands for (a special token: its name), as llguidance sees them.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let trie = self.env.tok_trie();
        if id as usize >= trie.vocab_size() {
            return Vec::new();
        }
        let b = trie.token(id);
        // Special tokens carry a marker byte before their name.
        match b.first() {
            Some(&m) if m == toktrie::TokTrie::SPECIAL_TOKEN_MARKER => b[1..].to_vec(),
            _ => b.to_vec(),
        }
    }
}

/// One generation's grammar state. Cloning shares the state (a request is cloned on its way to
/// the engine thread; only the engine advances it).
#[derive(Clone)]
pub struct Constraint {
    matcher: Arc<std::sync::Mutex<Matcher>>,
    mask_secs: f64,
    steps: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("steps", &self.steps).finish_non_exhaustive()
    }
}

impl Constraint {
    fn lock(&self) -> std::sync::MutexGuard<'_, Matcher> {
        // A panic while holding the lock cannot leave a Matcher half-updated in a way we rely on.
        self.matcher.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the logit of every token the grammar does not allow next to -inf. Fails when the
    /// grammar allows no token at all (it is finished, or in error).
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let t = Instant::now();
        let mask = self.lock().compute_mask().map_err(|e| format!("grammar: {e}"))?;
        let mut allowed = 0usize;
        for (i, l) in logits.iter_mut().enumerate() {
            if mask.is_allowed(i as u32) {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        self.mask_secs += t.elapsed().as_secs_f64();
        self.steps += 1;
        if allowed == 0 {
            return Err("grammar: no token of the vocabulary can continue the reply".into());
        }
        Ok(())
    }

    /// Advances the grammar by the token picked.
    pub fn accept(&mut self, id: u32) -> Result<(), String> {
        let t = Instant::now();
        let r = self.lock().consume_token(id).map_err(|e| format!("grammar rejected token {id}: {e}"));
        self.mask_secs += t.elapsed().as_secs_f64();
        r
    }

    /// True when the grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.lock().is_stopped()
    }

    /// True when the reply may end here (the grammar accepts what was generated).
    pub fn is_accepting(&self) -> bool {
        self.lock().is_accepting().unwrap_or(false)
    }

    /// Seconds spent computing masks and advancing, and the number of masks computed.
    pub fn cost(&self) -> (f64, usize) {
        (self.mask_secs, self.steps)
    }
}

/// The Lark grammar of a reply that is one or more tool calls, in the model's own format, each
/// calling one of `tools` ((name, parameters schema); a forced function: just that one).
///
/// * Hermes JSON ([`ToolFormat::HermesJson`]): `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`,
///   ARGS valid against that function's schema.
/// * Qwen XML ([`ToolFormat::QwenXml`]): `<tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n…
///   </function>\n</tool_call>`: the parameters in the schema's order, the required ones always,
///   the others optional, no unknown ones; a string parameter's VALUE is raw text (one of the
///   values when it has an `enum`), any other parameter's VALUE is JSON valid against its schema.
///
/// With `parallel`, calls may follow each other separated by a newline; without, the reply is
/// exactly one call. The reply ends after a call.
pub fn tool_call_grammar(format: ToolFormat, tools: &[(String, Json)], parallel: bool) -> Result<String, String> {
    if tools.is_empty() {
        return Err("no tools to call".into());
    }
    let lit = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let mut g = String::from(if parallel { "start: call (\"\\n\" call)*\n" } else { "start: call\n" });
    let alts: Vec<String> = (0..tools.len()).map(|i| format!("f{i}")).collect();
    match format {
        ToolFormat::HermesJson => {
            g.push_str(&format!("call: <tool_call> \"\\n\" ({}) \"\\n\" </tool_call>\n", alts.join(" | ")));
            for (i, (name, params)) in tools.iter().enumerate() {
                let schema = json!({
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": params},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                    "x-guidance": json_layout(),
                });
                g.push_str(&format!("f{i}: %json {schema}\n"));
            }
        }
        ToolFormat::QwenXml => {
            g.push_str(&format!("call: <tool_call> \"\\n\" ({}) </tool_call>\n", alts.join(" | ")));
            g.push_str("text_value[lazy]: /(?s:.*)\\n<\\/parameter>\\n/\n");
            for (i, (name, params)) in tools.iter().enumerate() {
                let props = match params.get("properties") {
                    None | Some(Json::Null) => serde_json::Map::new(),
                    Some(Json::Object(p)) => p.clone(),
                    Some(_) => return Err(format!("tool `{name}`: `parameters.properties` must be an object")),
                };
                let required: Vec<&str> = params
                    .get("required")
                    .and_then(Json::as_array)
                    .map(|r| r.iter().filter_map(Json::as_str).collect())
                    .unwrap_or_default();
                let mut body = vec![lit(&format!("<function={name}>\n"))];
                for (j, (pname, pschema)) in props.iter().enumerate() {
                    let rule = format!("f{i}_p{j}");
                    let value = xml_value(pschema);
                    g.push_str(&format!("{rule}: {} {value}\n", lit(&format!("<parameter={pname}>\n"))));
                    body.push(if required.contains(&pname.as_str()) { rule } else { format!("{rule}?") });
                }
                body.push(lit("</function>\n"));
                g.push_str(&format!("f{i}: {}\n", body.join(" ")));
            }
        }
    }
    Ok(g)
}

/// The Lark for one XML parameter's value and its closing tag: raw text for a string (or
/// untyped) parameter, JSON for the others, as the tool-call parser converts them back.
fn xml_value(schema: &Json) -> String {
    let types: Vec<&str> = match schema.get("type") {
        Some(Json::String(t)) => vec![t.as_str()],
        Some(Json::Array(a)) => a.iter().filter_map(Json::as_str).collect(),
        _ => Vec::new(),
    };
    let close = "\"\\n</parameter>\\n\"";
    if types.is_empty() || types == ["string"] {
        if let Some(values) = schema.get("enum").and_then(Json::as_array)
            && !values.is_empty()
            && values.iter().all(Json::is_string)
        {
            let alts: Vec<String> = values
                .iter()
                .filter_map(Json::as_str)
                .map(|v| serde_json::to_string(v).expect("a string serializes"))
                .collect();
            return format!("({}) {close}", alts.join(" | "));
        }
        if types.is_empty() && schema.get("enum").is_some() {
            // Untyped enum of mixed values: JSON, as the parser reads it.
        } else {
            return "text_value".into();
        }
    }
    let mut s = schema.clone();
    if let Json::Object(o) = &mut s {
        o.entry("x-guidance").or_insert_with(json_layout);
    }
    format!("%json {s} {close}")
}
