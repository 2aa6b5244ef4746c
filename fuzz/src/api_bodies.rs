//! The `api_request` fuzz target's body (docs/reliability.md, class 8: API request bodies): any
//! bytes as the body of an OpenAI chat or legacy completion request or an Anthropic messages
//! request, through everything the server does before it would queue the request (parse,
//! validate every field, render the prompt with the built-in model's template and tokenize it,
//! build the grammar constraint of `response_format` or a forced tool call). The fuzz target
//! (fuzz_targets/api_request.rs) calls it, and crates/server/tests/fuzz_corpus.rs includes this
//! file to replay every committed input (fuzz/corpus/api_request/) on stable in CI. It returns
//! normally for any input (a client error is a normal return); a panic is a finding.

use flashmoe_server::RequestCheck;
use std::sync::{Arc, OnceLock};

/// The endpoint of an input: its first byte modulo 3.
pub const PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/messages"];

fn checker() -> &'static RequestCheck {
    static C: OnceLock<RequestCheck> = OnceLock::new();
    C.get_or_init(|| {
        // The built-in model, found from whichever crate includes this file.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(|a| a.join("models/qwen35-moe-tiny-trained"))
            .find(|p| p.join("config.json").exists())
            .expect("models/qwen35-moe-tiny-trained");
        let engine = flashmoe::generate::Engine::load(&dir).expect("the built-in model loads");
        RequestCheck::new(Arc::new(engine))
    })
}

pub fn api_request(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else { return };
    let path = PATHS[first as usize % PATHS.len()];
    // Ok (it would be queued) or a client error: both are fine.
    let _ = checker().check(path, body);
}
