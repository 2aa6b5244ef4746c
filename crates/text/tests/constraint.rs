//! Grammar constraints (llguidance) over the real Qwen3 / Qwen3.5 tokenizers: the mask lets
//! through every token of a reply the grammar accepts, in the tokenization the tokenizer itself
//! produces, and blocks the first token of one it rejects; forced tool-call grammars follow the
//! formats the models' chat templates teach (toolcall.rs parses the same texts).

mod common;

use common::load_tokenizer;
use flashmoe_text::constraint::tool_call_grammar;
use flashmoe_text::toolcall::{ToolCallParser, ToolFormat, collect};
use flashmoe_text::{Constraint, GrammarSpec, Grammars, TextTokenizer, token_logprob};
use serde_json::{Value as Json, json};
use std::sync::OnceLock;

fn grammars(name: &str) -> &'static Grammars {
    static QWEN3: OnceLock<Grammars> = OnceLock::new();
    static QWEN35: OnceLock<Grammars> = OnceLock::new();
    let cell = if name == "qwen3" { &QWEN3 } else { &QWEN35 };
    cell.get_or_init(|| {
        let tok = load_tokenizer(name);
        let stop = tok.token_to_id("<|im_end|>").unwrap();
        Grammars::new(tok, tok.vocab_size(), &[stop]).unwrap()
    })
}

/// Feeds `text`'s tokens through a constraint, the way the generation loop does (mask, then
/// accept). Returns the index of the first token the mask blocks, or None when all pass.
fn first_blocked(tok: &TextTokenizer, c: &mut Constraint, text: &str) -> Option<usize> {
    let ids = tok.encode(text, false).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        let mut logits = vec![0.0f32; tok.vocab_size()];
        c.mask_logits(&mut logits).unwrap();
        if logits[id as usize] == f32::NEG_INFINITY {
            return Some(i);
        }
        c.accept(id).unwrap();
    }
    None
}

fn weather_tools() -> Vec<(String, Json)> {
    vec![
        (
            "get_weather".into(),
            json!({"type": "object", "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "days"]}),
        ),
        (
            "get_time".into(),
            json!({"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}),
        ),
    ]
}

#[test]
fn json_object_accepts_json_and_blocks_text() {
    let (tok, g) = (load_tokenizer("qwen3.5"), grammars("qwen3.5"));
    let mut c = g.compile(&GrammarSpec::JsonObject).unwrap();
    assert_eq!(first_blocked(tok, &mut c, r#"{"a": [1, 2.5, "x"], "b": {"c": null}}"#), None);
    assert!(c.is_accepting());
    // The cost per token over the 248k vocabulary (`--nocapture` shows it; docs quote it).
    let (secs, steps) = c.cost();
    eprintln!("json_object, qwen3.5 vocabulary: {:.3} ms per token over {steps} tokens", secs * 1e3 / steps as f64);
    let mut c = g.compile(&GrammarSpec::JsonObject).unwrap();
    assert_eq!(first_blocked(tok, &mut c, "Sure! {\"a\": 1}"), Some(0));
    // An array is JSON but not an object.
    let mut c = g.compile(&GrammarSpec::JsonObject).unwrap();
    assert_eq!(first_blocked(tok, &mut c, "[1]"), Some(0));
}

#[test]
fn json_schema_enforces_types_enums_and_ends() {
    let (tok, g) = (load_tokenizer("qwen3.5"), grammars("qwen3.5"));
    let schema = json!({"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": false});
    let spec = GrammarSpec::JsonSchema(schema);
    let mut c = g.compile(&spec).unwrap();
    assert_eq!(first_blocked(tok, &mut c, r#"{"city": "Rome", "days": 3}"#), None);
    // Complete: nothing can follow but the end, and the loop stops on its own.
    assert!(c.is_finished() || c.is_accepting());
    for bad in [r#"{"city": "Oslo", "days": 3}"#, r#"{"city": "Rome", "days": 9}"#, r#"{"city": "Rome", "x": 1}"#] {
        let mut c = g.compile(&spec).unwrap();
        assert!(first_blocked(tok, &mut c, bad).is_some(), "{bad}");
    }
}

#[test]
fn schemas_llguidance_cannot_compile_are_errors_naming_the_problem() {
    let g = grammars("qwen3.5");
    let err = g.compile(&GrammarSpec::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1}))).unwrap_err();
    assert!(err.to_lowercase().contains("unsatisfiable") || err.contains("minimum"), "{err}");
    let err = g.compile(&GrammarSpec::JsonSchema(json!({"type": "no-such-type"}))).unwrap_err();
    assert!(err.contains("no-such-type"), "{err}");
    assert!(g.compile(&GrammarSpec::JsonSchema(json!(3))).is_err());
    assert!(g.compile(&GrammarSpec::Lark("start: (".into())).is_err());
}

#[test]
fn forced_qwen_xml_tool_call_restricts_names_parameters_and_values() {
    let (tok, g) = (load_tokenizer("qwen3.5"), grammars("qwen3.5"));
    let tools = weather_tools();
    let lark = tool_call_grammar(ToolFormat::QwenXml, &tools, true).unwrap();
    let spec = GrammarSpec::Lark(lark);
    let good = "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n\
                <parameter=days>\n2\n</parameter>\n<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>";
    let mut c = g.compile(&spec).unwrap();
    assert_eq!(first_blocked(tok, &mut c, good), None);
    assert!(c.is_accepting());
    // The text it forced is a call the parser reads back with the schema's types.
    let mut p = ToolCallParser::new(ToolFormat::QwenXml, false, Some(tools.clone()));
    let mut events = p.push(good);
    events.extend(p.finish());
    let (_, _, calls) = collect(events);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].name, "get_weather");
    assert_eq!(calls[0].arguments, json!({"city": "New York", "days": 2, "unit": "celsius"}));
    let bad = [
        // plain text instead of a call
        "I will call get_weather.",
        // a function not offered
        "<tool_call>\n<function=get_stock>\n",
        // a parameter the schema does not have
        "<tool_call>\n<function=get_weather>\n<parameter=country>\n",
        // a required parameter left out
        "<tool_call>\n<function=get_weather>\n<parameter=days>\n",
        // a value of the wrong type / outside the enum
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nX\n</parameter>\n<parameter=days>\ntwo",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nX\n</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=unit>\nkelvin",
    ];
    for b in bad {
        let mut c = g.compile(&spec).unwrap();
        assert!(first_blocked(tok, &mut c, b).is_some(), "{b:?} passed");
    }
    // A named function: only that one.
    let only = GrammarSpec::Lark(tool_call_grammar(ToolFormat::QwenXml, &tools[1..], false).unwrap());
    let mut c = g.compile(&only).unwrap();
    assert!(first_blocked(tok, &mut c, "<tool_call>\n<function=get_weather>\n").is_some());
    let mut c = g.compile(&only).unwrap();
    assert_eq!(
        first_blocked(
            tok,
            &mut c,
            "<tool_call>\n<function=get_time>\n<parameter=zone>\nCET\n</parameter>\n</function>\n</tool_call>"
        ),
        None
    );
}

#[test]
fn forced_hermes_tool_call_validates_arguments() {
    let (tok, g) = (load_tokenizer("qwen3"), grammars("qwen3"));
    let spec = GrammarSpec::Lark(tool_call_grammar(ToolFormat::HermesJson, &weather_tools(), true).unwrap());
    let good =
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 4}}\n</tool_call>";
    let mut c = g.compile(&spec).unwrap();
    assert_eq!(first_blocked(tok, &mut c, good), None);
    assert!(c.is_accepting());
    for bad in [
        "<tool_call>\n{\"name\": \"get_stock\"",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"days\": 4}}",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 40}}",
    ] {
        let mut c = g.compile(&spec).unwrap();
        assert!(first_blocked(tok, &mut c, bad).is_some(), "{bad:?} passed");
    }
}

#[test]
fn stop_tokens_are_allowed_only_where_the_grammar_may_end() {
    let (tok, g) = (load_tokenizer("qwen3.5"), grammars("qwen3.5"));
    let stop = tok.token_to_id("<|im_end|>").unwrap() as usize;
    let mut c = g.compile(&GrammarSpec::JsonObject).unwrap();
    let mut logits = vec![0.0f32; tok.vocab_size()];
    c.mask_logits(&mut logits).unwrap();
    assert_eq!(logits[stop], f32::NEG_INFINITY);
    assert_eq!(first_blocked(tok, &mut c, "{}"), None);
    let mut logits = vec![0.0f32; tok.vocab_size()];
    if !c.is_finished() {
        c.mask_logits(&mut logits).unwrap();
        assert_eq!(logits[stop], 0.0);
    }
    // Token bytes: what llguidance matched against, the tokenizer's own text.
    let brace = tok.encode("{", false).unwrap()[0];
    assert_eq!(g.token_bytes(brace), b"{");
    assert_eq!(g.token_bytes(stop as u32), b"<|im_end|>");
}

#[test]
fn token_logprob_is_log_softmax() {
    // softmax([0, ln 3, -inf, NaN]) = [1/4, 3/4, 0, 0].
    let logits = [0.0f32, 3f32.ln(), f32::NEG_INFINITY, f32::NAN];
    let lp = token_logprob(&logits, 0, 2);
    assert!((lp.logprob - 0.25f32.ln()).abs() < 1e-6);
    assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 0]);
    assert!((lp.top[0].1 - 0.75f32.ln()).abs() < 1e-6);
    assert_eq!(token_logprob(&logits, 2, 0).logprob, f32::NEG_INFINITY);
    assert!(token_logprob(&logits, 1, 0).top.is_empty());
}
