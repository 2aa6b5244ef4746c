//! Tool-call parsing of generated text: both Qwen formats, streaming in any chunking, thinking,
//! schema-typed XML values, malformed input, and round trips through the chat templates.

mod common;

use common::{read_json, testdata};
use flashmoe_text::ChatTemplate;
use flashmoe_text::toolcall::{Event, ToolCall, ToolCallParser, ToolFormat, collect, detect_format};
use serde_json::{Value, json};

fn parser(format: ToolFormat, thinking: bool, tools: Option<&Value>) -> ToolCallParser {
    let known = tools.map(|t| {
        t.as_array()
            .unwrap()
            .iter()
            .map(|t| (t["function"]["name"].as_str().unwrap().to_string(), t["function"]["parameters"].clone()))
            .collect()
    });
    ToolCallParser::new(format, thinking, known)
}

/// All events of `text` fed in one chunk.
fn events_whole(format: ToolFormat, thinking: bool, tools: Option<&Value>, text: &str) -> Vec<Event> {
    let mut p = parser(format, thinking, tools);
    let mut ev = p.push(text);
    ev.extend(p.finish());
    ev
}

/// All events of `text` fed one character at a time.
fn events_chars(format: ToolFormat, thinking: bool, tools: Option<&Value>, text: &str) -> Vec<Event> {
    let mut p = parser(format, thinking, tools);
    let mut ev = Vec::new();
    let mut b = [0u8; 4];
    for c in text.chars() {
        ev.extend(p.push(c.encode_utf8(&mut b)));
    }
    ev.extend(p.finish());
    ev
}

type Parsed = (String, String, Vec<(String, Value)>);

fn strip_ids((c, r, calls): (String, String, Vec<ToolCall>)) -> Parsed {
    for call in &calls {
        assert!(call.id.starts_with("call_") && call.id.len() > 8, "{}", call.id);
    }
    (c, r, calls.into_iter().map(|c| (c.name, c.arguments)).collect())
}

/// Parses `text` whole, char by char and in 3- and 7-byte-ish chunks; all must agree. Also checks
/// the event order of each call (Start, Args…, End) and that the args deltas form JSON.
fn parse(format: ToolFormat, thinking: bool, tools: Option<&Value>, text: &str) -> Parsed {
    let whole = events_whole(format, thinking, tools, text);
    check_order(&whole);
    let want = strip_ids(collect(whole));
    let chars = events_chars(format, thinking, tools, text);
    check_order(&chars);
    assert_eq!(strip_ids(collect(chars)), want, "char-by-char differs for {text:?}");
    for n in [2, 3, 7] {
        let mut p = parser(format, thinking, tools);
        let mut ev = Vec::new();
        let cs: Vec<char> = text.chars().collect();
        for chunk in cs.chunks(n) {
            ev.extend(p.push(&chunk.iter().collect::<String>()));
        }
        ev.extend(p.finish());
        check_order(&ev);
        assert_eq!(strip_ids(collect(ev)), want, "chunks of {n} differ for {text:?}");
    }
    want
}

fn check_order(events: &[Event]) {
    let mut open: Option<usize> = None;
    let mut next = 0;
    let mut args = String::new();
    for e in events {
        match e {
            Event::ToolCallStart { index, .. } => {
                assert!(open.is_none(), "call started inside another: {events:?}");
                assert_eq!(*index, next);
                open = Some(*index);
                args.clear();
            }
            Event::ToolCallArgs { index, delta_json } => {
                assert_eq!(Some(*index), open);
                args.push_str(delta_json);
            }
            Event::ToolCallEnd { index } => {
                assert_eq!(Some(*index), open);
                let v: Value = serde_json::from_str(&args).unwrap_or_else(|e| panic!("args {args:?}: {e}"));
                assert!(v.is_object());
                open = None;
                next += 1;
            }
            Event::Text(t) | Event::Reasoning(t) => {
                assert!(open.is_none(), "text inside a call: {events:?}");
                assert!(!t.is_empty());
            }
        }
    }
    assert!(open.is_none(), "unterminated call: {events:?}");
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "search_docs", "parameters": {"type": "object", "properties": {
            "query": {"type": "string"},
            "filters": {"type": "object"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "score": {"type": "number"},
            "exact": {"type": "boolean"},
            "since": {"type": ["string", "null"]},
            "limit": {"type": "integer"}}}}}
    ])
}

const XML: ToolFormat = ToolFormat::QwenXml;
const JSON_FMT: ToolFormat = ToolFormat::HermesJson;

#[test]
fn detects_format_from_template() {
    assert_eq!(detect_format("{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}"), ToolFormat::QwenXml);
    let qwen3 = ChatTemplate::from_tokenizer_config(testdata().join("qwen3-tokenizer_config.json")).unwrap().unwrap();
    assert_eq!(detect_format(qwen3.source()), ToolFormat::HermesJson);
}

#[test]
fn plain_text_passes_through() {
    let (c, r, calls) = parse(XML, false, None, "Hello, world! a < b and x<y, <b>bold</b> <tool");
    assert_eq!(c, "Hello, world! a < b and x<y, <b>bold</b> <tool");
    assert!(r.is_empty() && calls.is_empty());
}

#[test]
fn holds_back_only_possible_tags() {
    let mut p = ToolCallParser::new(XML, false, None);
    assert_eq!(p.push("Hi <"), vec![Event::Text("Hi".into())]);
    assert_eq!(p.push("b"), vec![Event::Text(" <b".into())]);
    assert_eq!(p.push(" and <tool_"), vec![Event::Text(" and".into())]);
    let ev = p.push("call>\n<function=f>\n</function>\n</tool_call>");
    assert!(matches!(&ev[0], Event::ToolCallStart { index: 0, name, .. } if name == "f"), "{ev:?}");
    assert_eq!(ev[1], Event::ToolCallArgs { index: 0, delta_json: "{}".into() });
    assert_eq!(ev[2], Event::ToolCallEnd { index: 0 });
    assert!(p.finish().is_empty());
}

#[test]
fn xml_call_streams_per_parameter() {
    let t = tools();
    let mut p = parser(XML, false, Some(&t));
    let mut ev = p.push("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n");
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(ev[1], Event::ToolCallArgs { index: 0, delta_json: r#"{"city":"Paris""#.into() });
    ev = p.push("<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>");
    assert_eq!(
        ev,
        vec![
            Event::ToolCallArgs { index: 0, delta_json: r#","days":3"#.into() },
            Event::ToolCallArgs { index: 0, delta_json: "}".into() },
            Event::ToolCallEnd { index: 0 }
        ]
    );
}

#[test]
fn xml_multiple_calls_with_text_before() {
    let t = tools();
    let text = "Let me check both cities.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n\
                </function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\n東京\n</parameter>\n\
                <parameter=days>\n2\n</parameter>\n</function>\n</tool_call>";
    let (c, r, calls) = parse(XML, false, Some(&t), text);
    assert_eq!(c, "Let me check both cities.");
    assert_eq!(r, "");
    assert_eq!(
        calls,
        vec![
            ("get_weather".to_string(), json!({"city": "Paris"})),
            ("get_weather".to_string(), json!({"city": "東京", "days": 2}))
        ]
    );
}

#[test]
fn xml_values_typed_by_schema() {
    let t = tools();
    let text = "<tool_call>\n<function=search_docs>\n\
        <parameter=query>\n123\n</parameter>\n\
        <parameter=filters>\n{\"tags\": [\"api\"], \"since\": null}\n</parameter>\n\
        <parameter=tags>\n['a', \"b\"]\n</parameter>\n\
        <parameter=score>\n0.75\n</parameter>\n\
        <parameter=exact>\nTrue\n</parameter>\n\
        <parameter=since>\nnull\n</parameter>\n\
        <parameter=limit>\n5\n</parameter>\n\
        <parameter=extra>\n[1, 2]\n</parameter>\n\
        <parameter=note>\nnot json\n</parameter>\n\
        </function>\n</tool_call>";
    let (_, _, calls) = parse(XML, false, Some(&t), text);
    assert_eq!(
        calls[0].1,
        json!({"query": "123", "filters": {"tags": ["api"], "since": null}, "tags": ["a", "b"], "score": 0.75,
               "exact": true, "since": null, "limit": 5, "extra": [1, 2], "note": "not json"})
    );
    // Without schemas: JSON when it parses, else the raw string.
    let (_, _, calls) = parse(XML, false, None, text);
    assert_eq!(
        calls[0].1,
        json!({"query": 123, "filters": {"tags": ["api"], "since": null}, "tags": "['a', \"b\"]", "score": 0.75,
               "exact": "True", "since": null, "limit": 5, "extra": [1, 2], "note": "not json"})
    );
}

#[test]
fn xml_string_values_keep_inner_newlines() {
    let text = "<tool_call>\n<function=bash>\n<parameter=command>\n\nfor i in 1 2; do\n  echo \"$i\" > /dev/null\ndone\n\n\
                </parameter>\n</function>\n</tool_call>";
    let schema = json!({"type": "object", "properties": {"command": {"type": "string"}}});
    let mut p = ToolCallParser::new(XML, false, Some(vec![("bash".into(), schema)]));
    let mut ev = p.push(text);
    ev.extend(p.finish());
    let (_, _, calls) = collect(ev);
    // Exactly one leading and one trailing newline are the template's.
    assert_eq!(calls[0].arguments, json!({"command": "\nfor i in 1 2; do\n  echo \"$i\" > /dev/null\ndone\n"}));
}

#[test]
fn xml_tolerates_missing_closing_tags() {
    let text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n<parameter=days>\n4\n</tool_call>";
    let t = tools();
    let (_, _, calls) = parse(XML, false, Some(&t), text);
    assert_eq!(calls, vec![("get_weather".to_string(), json!({"city": "Oslo", "days": 4}))]);
    // Generation stopped inside a call: it is closed with what was there.
    let text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo";
    let (c, _, calls) = parse(XML, false, Some(&t), text);
    assert_eq!(c, "");
    assert_eq!(calls, vec![("get_weather".to_string(), json!({"city": "Oslo"}))]);
}

#[test]
fn hermes_json_calls() {
    let text = "I will search.\n<tool_call>\n{\"name\": \"search_docs\", \"arguments\": {\"query\": \"rate limits\", \
                \"filters\": {\"tags\": [\"api\"]}, \"exact\": true}}\n</tool_call>\n<tool_call>\n\
                {\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}\n</tool_call>";
    let (c, r, calls) = parse(JSON_FMT, false, None, text);
    assert_eq!(c, "I will search.");
    assert_eq!(r, "");
    assert_eq!(
        calls,
        vec![
            ("search_docs".to_string(), json!({"query": "rate limits", "filters": {"tags": ["api"]}, "exact": true})),
            ("get_weather".to_string(), json!({"city": "Paris"}))
        ]
    );
    // Either body parses with either format.
    assert_eq!(parse(XML, false, None, text).2, calls);
    let xml = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>";
    assert_eq!(parse(JSON_FMT, false, None, xml).2, vec![("f".to_string(), json!({"a": 1}))]);
}

#[test]
fn thinking_then_answer() {
    let text = "The user wants a greeting.\nKeep it short.\n</think>\n\nHello!";
    let (c, r, calls) = parse(XML, true, None, text);
    assert_eq!((c.as_str(), r.as_str()), ("Hello!", "The user wants a greeting.\nKeep it short."));
    assert!(calls.is_empty());
    // `<think>` opened by the model itself.
    let text = "<think>\nhmm <tool_call> is not a call in here\n</think>\n\nDone.";
    let (c, r, calls) = parse(JSON_FMT, false, None, text);
    assert_eq!((c.as_str(), r.as_str()), ("Done.", "hmm <tool_call> is not a call in here"));
    assert!(calls.is_empty());
    // Thinking, then a call.
    let text = "I need the weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n\
                </function>\n</tool_call>";
    let t = tools();
    let (c, r, calls) = parse(XML, true, Some(&t), text);
    assert_eq!((c.as_str(), r.as_str()), ("", "I need the weather."));
    assert_eq!(calls, vec![("get_weather".to_string(), json!({"city": "Rome"}))]);
    // Unterminated thinking stays reasoning.
    let (c, r, _) = parse(XML, true, None, "still thinking <");
    assert_eq!((c.as_str(), r.as_str()), ("", "still thinking <"));
}

#[test]
fn malformed_calls_become_text() {
    for text in [
        "<tool_call>\nthis is not a call\n</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": [1]}\n</tool_call>",
        "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"argu",
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        "<tool_call>\n<function=f",
        "<tool_call>",
    ] {
        for fmt in [XML, JSON_FMT] {
            let (c, _, calls) = parse(fmt, false, None, &format!("Before. {text}"));
            assert!(calls.is_empty(), "{text:?}: {calls:?}");
            assert_eq!(c, format!("Before. {}", text.trim_end()), "{text:?}");
        }
    }
    // Text after a malformed block goes on, and a later good call still parses.
    let text = "<tool_call>oops</tool_call> then <tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>";
    let (c, _, calls) = parse(JSON_FMT, false, None, text);
    assert_eq!(c, "<tool_call>oops</tool_call> then");
    assert_eq!(calls, vec![("g".to_string(), json!({}))]);
}

#[test]
fn ids_are_unique_and_indices_count() {
    let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
    let (_, _, calls) = collect(events_whole(JSON_FMT, false, None, text));
    assert_eq!(calls.len(), 2);
    assert_ne!(calls[0].id, calls[1].id);
}

/// The generated part of an assistant turn as `tpl` renders it: the conversation with the turn,
/// minus the conversation before it with the generation prompt, minus the end-of-turn marker.
fn generated_part(tpl: &ChatTemplate, before: &Value, assistant: &Value, tools: &Value) -> String {
    let mut all = before.as_array().unwrap().clone();
    all.push(assistant.clone());
    let full = tpl.render(&Value::Array(all), Some(tools), false, None, None).unwrap();
    let prompt = tpl.render(before, Some(tools), true, None, None).unwrap();
    assert!(full.starts_with(&prompt), "prompt is not a prefix:\n{prompt}\n---\n{full}");
    let generated = &full[prompt.len()..];
    generated.strip_suffix("<|im_end|>\n").unwrap_or(generated).to_string()
}

fn expected_calls(assistant: &Value) -> Vec<(String, Value)> {
    assistant["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let args = &c["function"]["arguments"];
            let args = match args {
                Value::String(s) => serde_json::from_str(s).unwrap(),
                v => v.clone(),
            };
            (c["function"]["name"].as_str().unwrap().to_string(), args)
        })
        .collect()
}

#[test]
fn qwen3_template_round_trip() {
    let tpl = ChatTemplate::from_tokenizer_config(testdata().join("qwen3-tokenizer_config.json")).unwrap().unwrap();
    let fixture = read_json("chat_qwen3.json");
    let mut checked = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let msgs = case["messages"].as_array().unwrap();
        let Some(tools) = case.get("tools").filter(|t| !t.is_null()) else { continue };
        for (i, m) in msgs.iter().enumerate() {
            if m["role"] != "assistant" || m.get("tool_calls").is_none_or(Value::is_null) {
                continue;
            }
            let generated = generated_part(&tpl, &Value::Array(msgs[..i].to_vec()), m, tools);
            assert!(generated.contains("<tool_call>\n{\"name\": "), "{generated}");
            let format = detect_format(tpl.source());
            let (content, reasoning, calls) = parse(format, false, Some(tools), &generated);
            assert_eq!(calls, expected_calls(m), "{}", case["name"]);
            assert_eq!(content, m["content"].as_str().unwrap_or("").trim());
            assert_eq!(reasoning, m.get("reasoning_content").and_then(Value::as_str).unwrap_or(""));
            checked += 1;
        }
    }
    assert!(checked >= 3, "{checked}");
}

/// The assistant tool-call part of the Qwen3.5 template (Qwen3-Coder style), as rendered form
/// described in the spec (§4.2): reasoning block, content, then the XML calls; non-string values
/// with `| string` (Python `str`) for scalars and `tojson` for mappings and lists.
const QWEN35_STYLE_TEMPLATE: &str = r#"{%- for message in messages %}
{%- if message.role == "assistant" %}
{{- '<|im_start|>assistant\n<think>\n' + (message.reasoning_content or '') | trim + '\n</think>\n\n' }}
{%- set content = (message.content or '') | trim %}
{{- content }}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{%- if loop.first %}
{%- if content %}{{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
{%- else %}{{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}{%- endif %}
{%- else %}{{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}{%- endif %}
{%- for args_name, args_value in tool_call.arguments|items %}
{{- '<parameter=' + args_name + '>\n' }}
{%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
{{- args_value }}
{{- '\n</parameter>\n' }}
{%- endfor %}
{{- '</function>\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}{%- endif %}"#;

#[test]
fn qwen35_xml_template_round_trip() {
    let tpl = ChatTemplate::from_source(QWEN35_STYLE_TEMPLATE).unwrap();
    assert_eq!(detect_format(tpl.source()), ToolFormat::QwenXml);
    let t = tools();
    let user = json!([{"role": "user", "content": "Weather in Paris and 東京? Docs on limits."}]);
    let cases = [
        json!({"role": "assistant", "content": "", "reasoning_content": "Two cities, one search.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京", "days": 2}}},
                {"type": "function", "function": {"name": "search_docs", "arguments": {"query": "rate\nlimits", "filters":
                    {"tags": ["api", "limits"], "score": 0.75, "since": null}, "tags": ["x"], "score": 1.5, "exact": true,
                    "since": "2024-01-01", "limit": 3}}}]}),
        json!({"role": "assistant", "content": "Let me look that up.", "reasoning_content": "Search.",
            "tool_calls": [{"type": "function", "function": {"name": "search_docs", "arguments": {"query": "caching", "exact": false}}}]}),
    ];
    for m in &cases {
        let generated = generated_part(&tpl, &user, m, &t);
        assert!(generated.contains("<tool_call>\n<function="), "{generated}");
        // The generation prompt ends inside `<think>`.
        let (content, reasoning, calls) = parse(ToolFormat::QwenXml, true, Some(&t), &generated);
        assert_eq!(calls, expected_calls(m), "{generated}");
        assert_eq!(content, m["content"].as_str().unwrap());
        assert_eq!(reasoning, m["reasoning_content"].as_str().unwrap());
    }
}

/// Found by the `tool_calls` fuzz target: stray text inside a call that starts with a
/// multi-byte character was sliced inside that character (a panic in the server's relay).
#[test]
fn stray_multibyte_text_inside_a_call_is_skipped_not_a_panic() {
    for text in [
        "<tool_call>\n<function=f>\nݒ<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n<function=f>\n</function>ݒ junk</tool_call>",
    ] {
        for events in
            [events_whole(ToolFormat::QwenXml, false, None, text), events_chars(ToolFormat::QwenXml, false, None, text)]
        {
            let (_, _, calls) = collect(events);
            assert_eq!(calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["f"], "{text:?}");
        }
    }
}
