//! Chat-template rendering on arbitrary input: the first byte picks what is fuzzed.
//! - even: a chat request body (`{"messages", "tools", "chat_template_kwargs", …}` as an
//!   OpenAI client or `tokenize --chat` sends it) rendered by the real Qwen3 template and by
//!   the built-in model's template;
//! - odd: the template source itself, rendering a fixed conversation.
//!
//! Either way: a prompt or an error, never a panic or a hang (fuel), nor an unbounded output.
#![no_main]

use flashmoe_text::{ChatRequest, ChatTemplate};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn templates() -> &'static [ChatTemplate] {
    static T: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        let qwen3: serde_json::Value =
            serde_json::from_str(include_str!("../../testdata/text/qwen3-tokenizer_config.json")).unwrap();
        vec![
            ChatTemplate::from_source(qwen3["chat_template"].as_str().unwrap()).unwrap(),
            ChatTemplate::from_source(include_str!("../../models/qwen35-moe-tiny-trained/chat_template.jinja"))
                .unwrap(),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        let Ok(req) = serde_json::from_slice::<ChatRequest>(rest) else { return };
        for t in templates() {
            let _ = t.render_request(&req);
        }
    } else {
        let Ok(src) = std::str::from_utf8(rest) else { return };
        let Ok(t) = ChatTemplate::from_source(src) else { return };
        let messages = serde_json::json!([
            {"role": "system", "content": "s"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
            {"role": "tool", "content": "r"}
        ]);
        let tools =
            serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let _ = t.render(&messages, Some(&tools), true, Some(true), None);
    }
});
