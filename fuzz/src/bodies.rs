//! The bodies of the fuzz targets, one function per parser of outside bytes (docs/reliability.md,
//! class 8). The cargo-fuzz targets (fuzz_targets/, nightly) call them, and
//! crates/engine/tests/fuzz_corpora.rs includes this file to replay every committed input
//! (fuzz/corpus/TARGET/) on the stable toolchain in CI. A function returns normally for any
//! input; a panic or a failed assertion is a finding.

use flashmoe::ModelConfig;
use flashmoe::packed::{Manifest, TensorLayout};
use flashmoe::weights::TensorStore;
use flashmoe_text::toolcall::{Event, ToolCallParser, ToolFormat, collect, convert_param};
use flashmoe_text::{ChatRequest, ChatTemplate};
use std::path::Path;
use std::sync::Arc;
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

/// A target's body: any input, never a panic.
pub type Body = fn(&[u8]);

/// Every target by name (the folder of its corpus), in `cargo fuzz list` order.
pub const TARGETS: [(&str, Body); 7] = [
    ("chat_template", chat_template),
    ("gguf_header", gguf_header),
    ("model_config", model_config),
    ("packed_manifest", packed_manifest),
    ("safetensors_header", safetensors_header),
    ("safetensors_index", safetensors_index),
    ("tool_calls", tool_calls),
];

/// Chat-template rendering on arbitrary input: the first byte picks what is fuzzed.
/// - even: a chat request body (`{"messages", "tools", "chat_template_kwargs", …}` as an
///   OpenAI client or `tokenize --chat` sends it) rendered by the real Qwen3 template and by
///   the built-in model's template;
/// - odd: the template source itself, rendering a fixed conversation.
///
/// Either way: a prompt or an error, never a panic or a hang (fuel), nor an unbounded output.
pub fn chat_template(data: &[u8]) {
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
}

/// The GGUF header parser on arbitrary bytes: it must return (a header or an error), never
/// panic, hang or allocate beyond a small multiple of the input. What a parsed header offers
/// (tensor sizes, shapes, metadata values) must be usable without panicking too.
pub fn gguf_header(data: &[u8]) {
    let Ok(h) = flashmoe::gguf::Header::parse(data, Path::new("fuzz.gguf")) else { return };
    for t in &h.tensors {
        let _ = (t.end(), t.elements(), t.row_bytes(), t.torch_shape());
    }
    for (_, v) in &h.metadata {
        let _ = (v.brief(), v.as_int(), v.as_f64(), v.as_str(), v.as_bool());
        if let Some(a) = v.as_array() {
            let _ = (a.len(), a.item_type(), a.ints(), a.strings(), a.bools());
        }
    }
}

/// config.json on arbitrary bytes → ModelConfig: an error or a config whose derived sizes
/// (what the loader and the memory plan compute from it) do not overflow.
pub fn model_config(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(c) = ModelConfig::from_value(&v, Path::new("config.json")) else { return };
    assert_eq!(c.layer_kinds.len(), c.num_layers);
    let _ = (c.key_dim(), c.value_dim(), c.conv_dim(), c.rotary_dims());
    // One expert's three matrices and the embedding, in f32 bytes: must fit in 64 bits.
    let expert = 3 * c.moe_intermediate * c.hidden_size * 4;
    let embed = c.vocab_size * c.hidden_size * 4;
    let _ = (expert, embed, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
}

/// A packed model's manifest.json on arbitrary bytes: an error or a manifest whose sizes,
/// offsets and file names every reader can use as they are (no overflow, nothing outside the
/// model folder or outside an expert's blob).
pub fn packed_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(m) = Manifest::parse(text, Path::new("manifest.json")) else { return };
    let dir = Path::new("/models/m");
    for ef in &m.experts {
        let total = ef.stride * ef.num_experts as u64;
        assert!(total <= isize::MAX as u64);
        assert!(dir.join(&ef.file).starts_with(dir) && !ef.file.contains(".."));
        for c in &ef.components {
            assert!(c.offset + c.nbytes <= ef.blob_bytes);
        }
    }
    for t in &m.tensors {
        let _ = t.offset + t.nbytes;
    }
    // A GGUF-layout entry is whole blocks of a known GGML type, exactly `nbytes` of them.
    if m.layout == TensorLayout::Gguf {
        for t in m.tensors.iter().chain(m.experts.iter().flat_map(|ef| &ef.components)) {
            let ty = t.ggml_type().expect("the parser checked the GGML type");
            let (&cols, rows) = t.shape.split_last().expect("the parser checked the dims");
            let row = ty.row_bytes(cols).expect("the parser checked the blocks") as u64;
            let size = rows.iter().try_fold(row, |acc, &d| acc.checked_mul(d as u64));
            assert_eq!(size, Some(t.nbytes));
        }
    }
}

/// A safetensors file on arbitrary bytes (header length, JSON header, data): an error or
/// tensors whose byte views lie inside the file, never a panic; small float tensors convert.
pub fn safetensors_header(data: &[u8]) {
    let Ok(tensors) = TensorStore::safetensors_tensors(Arc::new(data.to_vec()), Path::new("fuzz.safetensors")) else {
        return;
    };
    for t in tensors {
        let _ = t.numel();
        let _ = t.to_f32_vec();
    }
}

/// `model.safetensors.index.json` on arbitrary bytes: an error or shard paths inside the folder.
pub fn safetensors_index(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let dir = Path::new("/models/m");
    if let Ok(files) = TensorStore::index_files(text, dir, &dir.join("model.safetensors.index.json")) {
        for f in files {
            let inside = f
                .strip_prefix(dir)
                .is_ok_and(|rel| rel.components().all(|c| matches!(c, std::path::Component::Normal(_))));
            assert!(inside, "{} escapes the folder", f.display());
        }
    }
}

/// The tool-call parsers (Qwen3.5 XML and Hermes JSON) on arbitrary model output, fed in
/// arbitrary pieces: events, never a panic; every call started is collected.
pub fn tool_calls(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let format = if flags & 1 == 0 { ToolFormat::QwenXml } else { ToolFormat::HermesJson };
    // A known tool with a typed schema, so XML values are converted by it.
    let schema = serde_json::json!({"type": "object", "properties": {
        "n": {"type": "integer"}, "x": {"type": "number"}, "b": {"type": "boolean"},
        "o": {"type": "object"}, "a": {"type": "array"}, "s": {"type": "string"}}});
    let tools = (flags & 4 != 0).then(|| vec![("f".to_string(), schema.clone())]);
    let mut p = ToolCallParser::new(format, flags & 2 != 0, tools);
    // Pieces as a generator emits them: split at every \x01 (tokens), char boundaries kept.
    let mut events: Vec<Event> = Vec::new();
    for piece in text.split('\u{1}') {
        events.extend(p.push(piece));
    }
    events.extend(p.finish());
    let starts = events.iter().filter(|e| matches!(e, Event::ToolCallStart { .. })).count();
    let (_content, _reasoning, calls) = collect(events);
    assert_eq!(calls.len(), starts);
    let _ = convert_param(text, schema.get("properties").and_then(|p| p.get("n")));
    let _ = convert_param(text, Some(&schema));
}
