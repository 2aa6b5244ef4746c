//! Chat-template rendering is bounded (issue 13, class 6): a template or input that would loop
//! for ever runs out of fuel, an output past the cap is refused, and the bound leaves room for
//! the longest real conversations (checked against Python's jinja2 on the real Qwen3 template).

mod common;

use common::testdata;
use flashmoe_text::chat::{MAX_RENDER_BYTES, RENDER_FUEL};
use flashmoe_text::{ChatTemplate, TextTokenizer};
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn a_template_that_loops_for_ever_runs_out_of_fuel_in_seconds() {
    let t = ChatTemplate::from_source(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let t0 = Instant::now();
    let e = t.render(&json!([{"role": "user", "content": "hi"}]), None, true, None, None).unwrap_err().to_string();
    let took = t0.elapsed();
    assert!(e.contains("fuel"), "{e}");
    assert!(took < Duration::from_secs(20), "{RENDER_FUEL} fuel took {took:?}");
    eprintln!("{RENDER_FUEL} instructions of fuel spent in {took:?}");
}

#[test]
fn a_rendering_past_the_output_cap_is_refused() {
    let each = MAX_RENDER_BYTES / 2 + 1;
    let t = ChatTemplate::from_source(&format!("{{{{ 'x' * {each} }}}}{{{{ 'y' * {each} }}}}")).unwrap();
    let e = t.render(&json!([]), None, false, None, None).unwrap_err().to_string();
    assert!(e.contains(&format!("exceeds {MAX_RENDER_BYTES} bytes")), "{e}");
    // Just under the cap renders.
    let t = ChatTemplate::from_source(&format!("{{{{ 'x' * {} }}}}", MAX_RENDER_BYTES - 1)).unwrap();
    assert_eq!(t.render(&json!([]), None, false, None, None).unwrap().len(), MAX_RENDER_BYTES - 1);
}

/// 4000 messages (far past any context: about 260k tokens) with the real Qwen3 template render
/// within the fuel, byte-identical to Python's jinja2 with transformers' settings.
#[test]
fn the_longest_real_conversation_fits_the_fuel_and_matches_jinja2() {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(testdata().join("qwen3-tokenizer_config.json")).unwrap())
            .unwrap();
    let source = cfg["chat_template"].as_str().unwrap();
    let messages: Vec<serde_json::Value> = (0..4000)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            json!({"role": role, "content": format!("message {i}: the quick brown fox jumps over the lazy dog, {i} times over")})
        })
        .collect();
    let messages = serde_json::Value::Array(messages);
    let t = ChatTemplate::from_source(source).unwrap();
    let t0 = Instant::now();
    let ours = t.render(&messages, None, true, None, None).unwrap();
    eprintln!("4000 messages: {} bytes in {:?}", ours.len(), t0.elapsed());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.jinja"), source).unwrap();
    std::fs::write(dir.path().join("m.json"), messages.to_string()).unwrap();
    let py = r#"
import json, sys, jinja2
from jinja2.ext import loopcontrols
env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
def raise_exception(m): raise Exception(m)
env.globals["raise_exception"] = raise_exception
env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False)
t = env.from_string(open(sys.argv[1]).read())
sys.stdout.write(t.render(messages=json.load(open(sys.argv[2])), add_generation_prompt=True))
"#;
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg(py)
        .arg(dir.path().join("t.jinja"))
        .arg(dir.path().join("m.json"))
        .output()
        .expect("python3 (with jinja2, scripts/ci_python_deps.sh)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(ours, String::from_utf8(o.stdout).unwrap());
}

/// Found by the `chat_template` fuzz target: `{%}` (opening and closing delimiters sharing the
/// `%`) made the `{% generation %}` rewrite slice backwards (a panic on a model's template).
#[test]
fn overlapping_tag_delimiters_are_a_syntax_error_not_a_panic() {
    for src in ["{%}", "{% generation %}x{%}", "a {%} generation"] {
        let e = ChatTemplate::from_source(src).expect_err("not a valid template").to_string();
        assert!(e.contains("invalid chat template"), "{src}: {e}");
    }
}

#[test]
fn a_fifo_or_device_as_a_text_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("tokenizer.json");
    mkfifo_named(&fifo);
    let e = TextTokenizer::load(&fifo).unwrap_err().to_string();
    assert!(e.contains("is a FIFO, not a regular file"), "{e}");
    let e = TextTokenizer::load("/dev/zero").unwrap_err().to_string();
    assert!(e.contains("is a device, not a regular file"), "{e}");
    std::fs::remove_file(&fifo).unwrap();
    mkfifo_named(&dir.path().join("chat_template.jinja"));
    let e = ChatTemplate::from_model_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("chat_template.jinja") && e.contains("FIFO"), "{e}");
}

fn mkfifo_named(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A namespace that holds itself (found by the chat_template fuzz target: a stack overflow in
/// printing it) is a clear error when printed or serialized, not a recursion without end.
#[test]
fn a_value_that_holds_itself_is_an_error_not_a_stack_overflow() {
    for body in ["{{ ns.n }}", "{{ ns.n|string }}", "{{ ns.n|tojson }}", "{{ [ns.n] }}"] {
        let t = ChatTemplate::from_source(&format!("{{%- set ns = namespace(n=0) %}}{{%- set ns.n = ns %}}{body}"))
            .unwrap();
        let e = t.render(&json!([]), None, false, None, None).unwrap_err().to_string();
        assert!(e.contains("nested deeper than"), "{body}: {e}");
    }
    // Deep but finite nesting within the limit still prints as Python would.
    let t = ChatTemplate::from_source("{{ [[[[1]]]] }}|{{ {'a': {'b': [none]}}|tojson }}").unwrap();
    assert_eq!(t.render(&json!([]), None, false, None, None).unwrap(), "[[[[1]]]]|{\"a\": {\"b\": [null]}}");
}
