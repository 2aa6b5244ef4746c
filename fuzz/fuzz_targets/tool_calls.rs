//! The tool-call parsers (Qwen3.5 XML and Hermes JSON) on arbitrary model output, fed in
//! arbitrary pieces: events, never a panic; every call started is collected.
#![no_main]

use flashmoe_text::toolcall::{Event, ToolCallParser, ToolFormat, collect, convert_param};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
