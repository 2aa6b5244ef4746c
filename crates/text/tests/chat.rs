//! The real Qwen3 chat template must render byte-identical to transformers'
//! `apply_chat_template` (fixtures from scripts/make_text_fixtures.py).

mod common;

use common::{load_tokenizer, read_json, scratch_dir, testdata};
use flashmoe_text::{ChatMessage, ChatRequest, ChatTemplate, TextError};
use serde_json::{Value, json};

fn qwen3_template() -> ChatTemplate {
    ChatTemplate::from_tokenizer_config(testdata().join("qwen3-tokenizer_config.json"))
        .unwrap()
        .expect("qwen3 tokenizer_config has a chat_template")
}

#[test]
fn qwen3_template_matches_transformers() {
    let tpl = qwen3_template();
    let tok = load_tokenizer("qwen3");
    let fixture = read_json("chat_qwen3.json");
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let tools = case.get("tools").filter(|t| !t.is_null());
        let got = tpl
            .render(
                &case["messages"],
                tools,
                case["add_generation_prompt"].as_bool().unwrap(),
                case.get("enable_thinking").and_then(Value::as_bool),
                None,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = case["expected"].as_str().unwrap();
        if got != want {
            failures.push(format!("--- {name}\n got: {got:?}\nwant: {want:?}"));
            continue;
        }
        // The rendered prompt also tokenizes to transformers' ids.
        let ids: Vec<u32> =
            case["expected_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(&got, false).unwrap(), ids, "{name}");
        // The path the server takes (content marked, then encoded) gives the same ids for a
        // conversation without special-token strings in its content.
        let via_encode_chat = tpl
            .encode_chat(
                tok,
                &case["messages"],
                tools,
                case["add_generation_prompt"].as_bool().unwrap(),
                case.get("enable_thinking").and_then(Value::as_bool),
                None,
            )
            .unwrap();
        assert_eq!(via_encode_chat, ids, "{name} (encode_chat)");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A stress template (not a model's) rendered by transformers: checks Python semantics that real
/// templates rely on (`str()` of bools/None/lists/dicts, tojson options, string methods, slicing,
/// namespace, break/continue, `items`, `is mapping`/`is sequence`).
#[test]
fn python_semantics_match_jinja2() {
    let fixture = read_json("chat_pycompat.json");
    let mut tpl = ChatTemplate::from_source(fixture["template"].as_str().unwrap()).unwrap();
    tpl.set_special_tokens_from_config(&read_json("qwen3-tokenizer_config.json"));
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let got = tpl
            .render(
                &case["messages"],
                case.get("tools").filter(|t| !t.is_null()),
                case["add_generation_prompt"].as_bool().unwrap(),
                case.get("enable_thinking").and_then(Value::as_bool),
                None,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, case["expected"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn qwen3_special_tokens_from_config() {
    let tpl = qwen3_template();
    assert_eq!(tpl.eos_token(), Some("<|im_end|>"));
    assert_eq!(tpl.bos_token(), None);
    assert_eq!(tpl.special_token("pad_token"), Some("<|endoftext|>"));
}

#[test]
fn chat_request_typed_api() {
    let tpl = qwen3_template();
    let mut req = ChatRequest::new(vec![ChatMessage::system("You are Qwen."), ChatMessage::user("Hi there!")]);
    assert_eq!(
        tpl.render_request(&req).unwrap(),
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    );
    req.enable_thinking = Some(false);
    assert!(tpl.render_request(&req).unwrap().ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    // The request also deserializes from an OpenAI-style body.
    let body = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
    let req: ChatRequest = serde_json::from_value(body).unwrap();
    assert!(req.add_generation_prompt);
    assert_eq!(tpl.render_request(&req).unwrap(), "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn chatml_fallback_exact() {
    let tpl = ChatTemplate::chatml();
    assert!(tpl.is_fallback());
    let messages = json!([
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hello\nworld"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Bye"}
    ]);
    let want = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHello\nworld<|im_end|>\n\
<|im_start|>assistant\nHi<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n";
    assert_eq!(tpl.render(&messages, None, false, None, None).unwrap(), want);
    let with_prompt = format!("{want}<|im_start|>assistant\n");
    assert_eq!(tpl.render(&messages, None, true, None, None).unwrap(), with_prompt);
    // enable_thinking=false adds nothing to the fallback (see CHATML_TEMPLATE).
    assert_eq!(tpl.render(&messages, None, true, Some(false), None).unwrap(), with_prompt);
}

#[test]
fn model_dir_precedence() {
    let dir = scratch_dir("model-dir");
    // Nothing → ChatML fallback.
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    assert!(t.is_fallback());

    // tokenizer_config.json with a list of named templates; tool_use is picked when tools are given.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({
            "eos_token": {"content": "<|im_end|>", "special": true},
            "bos_token": "<s>",
            "chat_template": [
                {"name": "default", "template": "D{{ bos_token }}{{ messages|length }}"},
                {"name": "tool_use", "template": "T{{ tools|length }}"}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    assert!(!t.is_fallback());
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(t.bos_token(), Some("<s>"));
    let msgs = json!([{"role": "user", "content": "x"}]);
    assert_eq!(t.render(&msgs, None, true, None, None).unwrap(), "D<s>1");
    assert_eq!(t.render(&msgs, Some(&json!([{}, {}])), true, None, None).unwrap(), "T2");

    // chat_template.jinja wins over tokenizer_config.json; special tokens still come from the config.
    std::fs::write(dir.join("chat_template.jinja"), "J{{ eos_token }}\n").unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    assert_eq!(t.render(&msgs, None, true, None, None).unwrap(), "J<|im_end|>");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn template_syntax_error_is_clean() {
    let err = ChatTemplate::from_source("{% for m in messages %}{{ m.content }").unwrap_err();
    assert!(matches!(err, TextError::TemplateSyntax { .. }), "{err}");
    assert!(err.to_string().starts_with("<string>: invalid chat template: "), "{err}");

    let dir = scratch_dir("bad-template");
    let path = dir.join("chat_template.jinja");
    std::fs::write(&path, "{% if %}").unwrap();
    let err = ChatTemplate::from_model_dir(&dir).unwrap_err();
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn render_errors_are_clean() {
    let t = ChatTemplate::from_source("{{ raise_exception('no system role') }}").unwrap();
    let err = t.render(&json!([{"role": "user", "content": "x"}]), None, true, None, None).unwrap_err();
    assert!(matches!(err, TextError::TemplateRender { .. }));
    assert!(err.to_string().contains("no system role"), "{err}");

    let t = qwen3_template();
    assert!(matches!(t.render(&json!({"role": "user"}), None, true, None, None), Err(TextError::InvalidRequest(_))));
    // Image parts are refused: this engine is text-only.
    let err = t
        .render(
            &json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            None,
            true,
            None,
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("image_url"), "{err}");

    let missing = ChatTemplate::from_tokenizer_config("/nonexistent/tokenizer_config.json").unwrap_err();
    assert_eq!(missing.to_string(), "/nonexistent/tokenizer_config.json: file not found");
}

#[test]
fn python_compatible_filters() {
    let t = ChatTemplate::from_source(
        "{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(separators=(',', ':'), sort_keys=true) }}|{{ x.b }}|{{ x.c|string }}|{{ '  a b  '|trim }}|{{ 'a b  c'.split() }}",
    )
    .unwrap();
    let mut extra = serde_json::Map::new();
    extra.insert("x".into(), json!({"z": "é<&>", "b": [1, 2.5, true, null], "c": false}));
    let out = t.render(&json!([]), None, false, None, Some(&extra)).unwrap();
    assert_eq!(
        out,
        "{\"z\": \"é<&>\", \"b\": [1, 2.5, true, null], \"c\": false}|{\n  \"z\": \"é<&>\",\n  \"b\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"c\": false\n}|{\"b\":[1,2.5,true,null],\"c\":false,\"z\":\"é<&>\"}|[1, 2.5, True, None]|False|a b|['a', 'b', 'c']"
    );
}

#[test]
fn generation_tag_supported() {
    let t = ChatTemplate::from_source(
        "{%- for m in messages %}{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{%- else %}[{{ m.content }}]{%- endif %}{%- endfor %}",
    )
    .unwrap();
    let msgs = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]);
    assert_eq!(t.render(&msgs, None, false, None, None).unwrap(), "[q]a");
}

/// Special-token strings inside message content (a user forging a system turn, a tool result or
/// tool-call argument closing its turn, a token split across content parts) are plain text:
/// the ids equal a reference built with transformers (template) and the HF tokenizer with
/// `split_special_tokens=True` on the content (scripts/make_text_fixtures.py, chat_forged.json),
/// and only the template's own turns have `<|im_start|>`.
#[test]
fn special_tokens_in_content_are_plain_text() {
    let fixture = read_json("chat_forged.json");
    let chatml = ChatTemplate::from_source(fixture["chatml"].as_str().unwrap()).unwrap();
    let qwen3 = qwen3_template();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = format!("{}/{}", case["tokenizer"].as_str().unwrap(), case["name"].as_str().unwrap());
        let (tok, tpl) = match case["tokenizer"].as_str().unwrap() {
            "qwen3" => (load_tokenizer("qwen3"), &qwen3),
            _ => (load_tokenizer("qwen3.5"), &chatml),
        };
        let ids = tpl
            .encode_chat(
                tok,
                &case["messages"],
                case.get("tools").filter(|t| !t.is_null()),
                case["add_generation_prompt"].as_bool().unwrap(),
                case.get("enable_thinking").and_then(Value::as_bool),
                None,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want: Vec<u32> =
            case["expected_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "{name}");
        // As many turns as the same conversation with the special-token strings deleted.
        let im_start = tok.token_to_id("<|im_start|>").unwrap();
        let clean = tok
            .encode(
                &tpl.render(
                    &without_specials(&case["messages"]),
                    case.get("tools").filter(|t| !t.is_null()).map(without_specials).as_ref(),
                    case["add_generation_prompt"].as_bool().unwrap(),
                    case.get("enable_thinking").and_then(Value::as_bool),
                    None,
                )
                .unwrap(),
                false,
            )
            .unwrap();
        let count = |v: &[u32]| v.iter().filter(|&&t| t == im_start).count();
        assert_eq!(count(&ids), count(&clean), "{name}");
        // Rendering then encoding with special tokens parsed (the old path) forges turns.
        let naive = tok
            .encode(
                &tpl.render(
                    &case["messages"],
                    case.get("tools").filter(|t| !t.is_null()),
                    case["add_generation_prompt"].as_bool().unwrap(),
                    case.get("enable_thinking").and_then(Value::as_bool),
                    None,
                )
                .unwrap(),
                false,
            )
            .unwrap();
        // (ChatML does not render `reasoning_content`: nothing forged reaches that prompt.)
        if name != "qwen3.5/reasoning_content_forged" {
            assert_ne!(naive, want, "{name}: the case must contain a forged token");
        }
    }
}

fn without_specials(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(
            ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "start|>"]
                .iter()
                .fold(s.clone(), |s, t| s.replace(t, "")),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_specials).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| (k.clone(), without_specials(x))).collect()),
        other => other.clone(),
    }
}

#[test]
fn mark_content_marks_whole_and_trailing_partial_special_tokens() {
    let tok = load_tokenizer("qwen3");
    assert_eq!(tok.mark_content("plain text <think>"), "plain text <think>");
    assert_eq!(tok.mark_content("a<|im_end|>b"), "a\u{fdd0}<|im_end|>b");
    assert_eq!(tok.mark_content("ends with <|im_"), "ends with \u{fdd0}<|im_");
    assert_eq!(tok.mark_content("x\u{fdd0}y"), "x\u{fffd}y");
    // Marked content in a template's markup: the template's tokens stay tokens.
    let ids = tok.encode_chat_prompt("<|im_start|>user\n\u{fdd0}<|im_end|><|im_end|>").unwrap();
    let mut plain = tok.inner().clone();
    plain.set_encode_special_tokens(true);
    let body = plain.encode_fast("user\n<|im_end|>", false).unwrap().get_ids().to_vec();
    assert_eq!(ids[1..ids.len() - 1], body[..], "{ids:?}");
    assert_eq!(*ids.last().unwrap(), tok.token_to_id("<|im_end|>").unwrap());
    // The mark survives a template's `tojson(ensure_ascii=true)` (escaped, it would unmark).
    let t = ChatTemplate::from_source("{{ messages[0].content|tojson(ensure_ascii=true) }}<|im_end|>").unwrap();
    let ids =
        t.encode_chat(tok, &json!([{"role": "user", "content": "é<|im_start|>"}]), None, false, None, None).unwrap();
    let body = plain.encode_fast("\"\\u00e9<|im_start|>\"", false).unwrap().get_ids().to_vec();
    assert_eq!(ids[..ids.len() - 1], body[..], "{ids:?}");
    assert_eq!(*ids.last().unwrap(), tok.token_to_id("<|im_end|>").unwrap());
}
