//! The `flashmoe` binary end to end: logits JSON against the transformers reference, `run`'s
//! summary line, `tokenize`, and one test per kind of bad input (a one-line error naming the file
//! and the problem, a non-zero exit, never a panic).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models")
}

fn flashmoe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must fail cleanly and returns its one-line error.
fn fails(args: &[&str]) -> String {
    let o = flashmoe(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure for {args:?}, stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    // Progress lines ([flashmoe] ...) may come first; the error itself is one line, the last.
    let errors: Vec<&str> = err.lines().filter(|l| !l.starts_with("[flashmoe] ")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: error should be one line: {err}");
    assert!(errors[0].starts_with("error: "), "{err}");
    errors[0].to_string()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A scratch copy of the flat single-file fixture.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&models_dir().join("qwen35-moe-tiny-flat"), &dir);
    (tmp, dir)
}

/// Rewrites the safetensors header JSON of `file` with `edit`, keeping its byte length (so the
/// tensor data stays where it was).
fn edit_header(file: &Path, edit: impl Fn(&str) -> String) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().to_string();
    let new = edit(&header);
    assert_ne!(new, header, "edit changed nothing");
    assert!(new.len() <= n);
    let mut padded = new.into_bytes();
    padded.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&padded);
    std::fs::write(file, bytes).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn logits_json_matches_transformers() {
    let dir = models_dir().join("qwen35-moe-tiny");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let ids: Vec<String> = r["prompt_ids"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
    let ids = ids.join(",");
    for decode in [false, true] {
        let mut args = vec!["logits", "--model", s(&dir), "--ids", &ids, "--json"];
        if decode {
            args.push("--decode");
        }
        let o = flashmoe(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let got: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(got["ids"], r["prompt_ids"]);
        let (g, w) = (got["logits"].as_array().unwrap(), r["logits"].as_array().unwrap());
        assert_eq!(g.len(), w.len());
        let (mut max_d, mut max_v) = (0.0f64, 0.0f64);
        for (gr, wr) in g.iter().zip(w) {
            for (a, b) in gr.as_array().unwrap().iter().zip(wr.as_array().unwrap()) {
                let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                max_d = max_d.max((a - b).abs());
                max_v = max_v.max(b.abs());
            }
        }
        assert!(max_d <= 1e-4 * max_v, "decode={decode}: max diff {max_d} vs max logit {max_v}");
    }
}

#[test]
fn run_streams_text_and_prints_summary() {
    let dir = models_dir().join("qwen35-moe-tiny");
    let o = flashmoe(&["run", "--model", s(&dir), "--prompt", "Hello there", "--max-tokens", "12"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let summary = err.lines().last().unwrap();
    for part in ["prompt ", "prefill ", "decode ", "peak RSS ", "experts 2/8 per token (exact)"] {
        assert!(summary.contains(part), "summary lacks `{part}`: {summary}");
    }
    let o = flashmoe(&["run", "--model", s(&dir), "--prompt", "Hello", "--max-tokens", "4", "--experts", "1", "--raw"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("experts 1/8 per token (REDUCED"), "{}", stderr(&o));
}

#[test]
fn run_json_schema_constrains_the_reply() {
    let dir = models_dir().join("qwen35-moe-tiny");
    let (_tmp, root) = scratch();
    let schema = root.join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["city", "days"], "additionalProperties": false}"#,
    )
    .unwrap();
    for seed in ["1", "2"] {
        let o = flashmoe(&[
            "run",
            "--model",
            s(&dir),
            "--prompt",
            "weather?",
            "--max-tokens",
            "100",
            "--temperature",
            "1",
            "--seed",
            seed,
            "--json-schema",
            s(&schema),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        // The random model's reply, read by serde_json: an object of exactly the schema's shape.
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", o.stdout));
        assert!(["Paris", "Rome"].contains(&v["city"].as_str().unwrap()), "{v}");
        assert!((1..=9).contains(&v["days"].as_u64().unwrap()), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 2);
    }
    let o = flashmoe(&["run", "--model", s(&dir), "--prompt", "x", "--max-tokens", "60", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with('{'));
    std::fs::write(&schema, r#"{"type": "integer", "minimum": 5, "maximum": 1}"#).unwrap();
    let err = fails(&["run", "--model", s(&dir), "--prompt", "x", "--json-schema", s(&schema)]);
    assert!(err.contains("schema.json: cannot constrain the reply"), "{err}");
    std::fs::write(&schema, "{").unwrap();
    let err = fails(&["run", "--model", s(&dir), "--prompt", "x", "--json-schema", s(&schema)]);
    assert!(err.contains("not valid JSON"), "{err}");
}

#[test]
fn run_is_deterministic_when_greedy_and_with_a_seed() {
    let dir = models_dir().join("qwen35-moe-tiny");
    let args = [
        "run",
        "--model",
        s(&dir),
        "--prompt",
        "abc",
        "--max-tokens",
        "16",
        "--raw",
        "--temperature",
        "0.8",
        "--seed",
        "7",
    ];
    let a = flashmoe(&args);
    let b = flashmoe(&args);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn tokenize_prints_ids() {
    let dir = models_dir().join("qwen35-moe-tiny");
    let o = flashmoe(&["tokenize", "--model", s(&dir), "--json", "<|im_start|>user"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<u32> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(ids.len() >= 2);
    let tok: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let im_start =
        tok["added_tokens"].as_array().unwrap().iter().find(|t| t["content"] == "<|im_start|>").unwrap()["id"]
            .as_u64()
            .unwrap();
    assert_eq!(ids[0] as u64, im_start);
}

#[test]
fn error_missing_model_file() {
    let (_t, dir) = scratch();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,2"]);
    assert!(e.contains("config.json: file not found"), "{e}");
    let e = fails(&["logits", "--model", "/nonexistent/model", "--ids", "1"]);
    assert!(e.contains("/nonexistent/model/config.json: file not found"), "{e}");
}

#[test]
fn error_truncated_safetensors() {
    let (_t, dir) = scratch();
    let f = dir.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 100).unwrap();
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,2"]);
    assert!(e.contains("model.safetensors: invalid safetensors file"), "{e}");
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn error_corrupt_safetensors_header() {
    let (_t, dir) = scratch();
    let f = dir.join("model.safetensors");
    edit_header(&f, |h| h.replacen("{", "#", 1));
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,2"]);
    assert!(e.contains("model.safetensors: invalid safetensors file: corrupt header JSON"), "{e}");
    // A header length pointing past the end of the file.
    let (_t2, dir2) = scratch();
    let f2 = dir2.join("model.safetensors");
    let mut b = std::fs::read(&f2).unwrap();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f2, b).unwrap();
    let e = fails(&["logits", "--model", s(&dir2), "--ids", "1,2"]);
    assert!(e.contains("model.safetensors: invalid safetensors file"), "{e}");
}

#[test]
fn error_shape_mismatch() {
    let (_t, dir) = scratch();
    // Same element count, transposed: the file stays valid, the model must refuse it.
    edit_header(&dir.join("model.safetensors"), |h| {
        h.replace(
            r#""model.embed_tokens.weight":{"dtype":"F32","shape":[320,64]"#,
            r#""model.embed_tokens.weight":{"dtype":"F32","shape":[64,320]"#,
        )
    });
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,2"]);
    assert!(e.contains("model.embed_tokens.weight") && e.contains("shape [64, 320], expected [320, 64]"), "{e}");
}

#[test]
fn error_unknown_dtype() {
    let (_t, dir) = scratch();
    edit_header(&dir.join("model.safetensors"), |h| {
        h.replace(r#""model.embed_tokens.weight":{"dtype":"F32""#, r#""model.embed_tokens.weight":{"dtype":"I32""#)
    });
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,2"]);
    assert!(e.contains("model.embed_tokens.weight") && e.contains("unsupported dtype I32"), "{e}");
    let (_t2, dir2) = scratch();
    edit_header(&dir2.join("model.safetensors"), |h| h.replacen(r#""dtype":"F32""#, r#""dtype":"Q9X""#, 1));
    let e = fails(&["logits", "--model", s(&dir2), "--ids", "1,2"]);
    assert!(e.contains("model.safetensors: invalid safetensors file") && e.contains("Q9X"), "{e}");
}

#[test]
fn error_missing_tokenizer() {
    let (_t, dir) = scratch();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = fails(&["run", "--model", s(&dir), "--prompt", "hi"]);
    assert!(e.contains("tokenizer.json: file not found"), "{e}");
    let e = fails(&["tokenize", "--tokenizer", "/nonexistent/tokenizer.json", "hi"]);
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
}

#[test]
fn error_malformed_config() {
    let (_t, dir) = scratch();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"qwen3_5_moe_text\", ").unwrap();
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,2"]);
    assert!(e.contains("config.json: malformed JSON"), "{e}");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "mixtral"}"#).unwrap();
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,2"]);
    assert!(e.contains("config.json: unsupported model_type `mixtral`"), "{e}");
}

#[test]
fn error_token_id_outside_vocabulary() {
    let dir = models_dir().join("qwen35-moe-tiny");
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,2,320"]);
    assert!(e.contains("token id 320 is outside the vocabulary"), "{e}");
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,x"]);
    assert!(e.contains("`x` is not a token id"), "{e}");
}

#[test]
fn error_prompt_longer_than_context() {
    let dir = models_dir().join("qwen35-moe-tiny");
    let e = fails(&[
        "run",
        "--model",
        s(&dir),
        "--prompt",
        "a rather long prompt that will not fit",
        "--raw",
        "--max-context",
        "8",
    ]);
    assert!(e.contains("exceed the context length of 8 tokens"), "{e}");
    let e = fails(&["logits", "--model", s(&dir), "--ids", "1,2,3,4,5", "--max-context", "4"]);
    assert!(e.contains("exceed the context length of 4 tokens"), "{e}");
}

#[test]
fn tokenize_chat_matches_transformers_apply_chat_template() {
    // Renderings and ids produced by transformers' apply_chat_template on the fixture tokenizer
    // (the real Qwen3 template), see scripts/make_model_fixtures.py.
    let dir = models_dir().join("qwen35-moe-tiny");
    let check: Value =
        serde_json::from_str(&std::fs::read_to_string(models_dir().join("tokenizer_check.json")).unwrap()).unwrap();
    for case in check["chat"].as_array().unwrap() {
        let mut req = serde_json::json!({"messages": case["args"]["conversation"]});
        if let Some(t) = case["args"].get("tools") {
            req["tools"] = t.clone();
        }
        if let Some(t) = case["args"].get("enable_thinking") {
            req["enable_thinking"] = t.clone();
        }
        for json in [false, true] {
            let mut args = vec!["tokenize", "--model", s(&dir), "--chat"];
            if json {
                args.push("--json");
            }
            let mut child = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
                .args(&args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(req.to_string().as_bytes()).unwrap();
            let o = child.wait_with_output().unwrap();
            assert!(o.status.success(), "{}: {}", case["name"], stderr(&o));
            if json {
                let ids: Value = serde_json::from_slice(&o.stdout).unwrap();
                assert_eq!(ids, case["ids"], "{}", case["name"]);
            } else {
                assert_eq!(
                    String::from_utf8(o.stdout).unwrap(),
                    case["rendered"].as_str().unwrap(),
                    "{}",
                    case["name"]
                );
            }
        }
    }
}

#[test]
fn convert_verify_and_run_a_packed_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("packed");
    let src = models_dir().join("qwen35-moe-tiny-mlx4");
    let o = flashmoe(&["convert", s(&src), s(&dst), "--expert-bits", "2", "--group-size", "32"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("experts.gate_proj") && err.contains("4-bit/g32") && err.contains("2-bit/g32"), "{err}");
    let o = flashmoe(&["verify", s(&dst)]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("ok: "), "{}", stderr(&o));
    for io in ["page", "auto"] {
        let o = flashmoe(&[
            "run",
            "--model",
            s(&dst),
            "--prompt",
            "hi",
            "--max-tokens",
            "6",
            "--io",
            io,
            "--ram-cache",
            "64K",
            "--timing",
            "--prefetch",
        ]);
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        let summary = err.lines().last().unwrap();
        assert!(summary.contains("/token | RAM cache hit ") && summary.contains(" | io "), "{summary}");
        assert!(summary.contains("| prefetch accuracy "), "{summary}");
        assert!(err.contains("per-layer time per decode token") && err.contains("io wait"), "{err}");
    }
    // A budget that cannot hold the non-expert weights is refused with the numbers.
    let e = fails(&["run", "--model", s(&dst), "--prompt", "hi", "--memory-budget", "1M"]);
    assert!(e.contains("memory budget 1.0 MiB is too small") && e.contains("non-expert weights"), "{e}");
    let o = flashmoe(&["run", "--model", s(&dst), "--prompt", "hi", "--max-tokens", "4", "--memory-budget", "64M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("[flashmoe] plan: budget 64.0 MiB"), "{}", stderr(&o));
    // Converting onto an existing folder needs --force.
    let e = fails(&["convert", s(&src), s(&dst)]);
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn sampling_flags_are_validated_like_the_server() {
    for (flag, value) in [
        ("--temperature", "NaN"),
        ("--temperature", "-1"),
        ("--top-p", "1.5"),
        ("--min-p", "inf"),
        ("--repetition-penalty", "11"),
        ("--presence-penalty", "-3"),
    ] {
        let arg = format!("{flag}={value}");
        let o = flashmoe(&["run", "--prompt", "hi", "--max-tokens", "1", &arg]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag) && (err.contains("must be between") || err.contains("not a number")), "{err}");
    }
}

#[test]
fn absurd_sizes_and_thread_counts_are_refused_not_wrapped() {
    let dir = models_dir().join("qwen35-moe-tiny");
    // A token count near 2^64 under a memory budget: the plan saturates and says it cannot fit.
    let e = fails(&[
        "run",
        "--model",
        s(&dir),
        "--prompt",
        "hi",
        "--max-tokens",
        "18446744073709551615",
        "--memory-budget",
        "1G",
    ]);
    assert!(e.contains("memory budget") && e.contains("too small"), "{e}");
    // Reads in flight are bounded (a huge value would try to start that many threads).
    let o = flashmoe(&["run", "--model", s(&dir), "--prompt", "hi", "--io-threads", "100000000"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--io-threads") && err.contains("1..=1024"), "{err}");
}

#[test]
fn routing_profile_is_saved_per_model_and_prewarms_the_next_run_without_changing_text() {
    let dir = models_dir().join("qwen35-moe-tiny");
    let home = tempfile::tempdir().unwrap();
    let run = |profile: &str| {
        Command::new(env!("CARGO_BIN_EXE_flashmoe"))
            .env("FLASHMOE_HOME", home.path())
            .args(["run", "--model", s(&dir), "--prompt", "Hello there", "--max-tokens", "8", "--raw"])
            .args(["--temperature", "0", "--ram-cache", "1M", "--routing-profile", profile])
            .output()
            .unwrap()
    };
    let saved = home.path().join("routing-profiles");
    let off = run("off");
    assert!(off.status.success(), "{}", stderr(&off));
    assert!(!saved.exists(), "--routing-profile off writes nothing");
    let first = run("auto");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(!stderr(&first).contains("pre-warm"), "nothing saved yet: {}", stderr(&first));
    let files: Vec<_> = std::fs::read_dir(&saved).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    let counts = v["0"]["counts"].as_array().unwrap();
    assert_eq!(counts.len(), 8);
    assert!(counts.iter().map(|c| c.as_u64().unwrap()).sum::<u64>() >= 2 * 8, "layer 0 counted every routed use");
    let second = run("auto");
    assert!(stderr(&second).contains("pre-warm (background): "), "{}", stderr(&second));
    assert_eq!(second.stdout, first.stdout, "same greedy text with the tiers pre-warmed");
    assert_eq!(off.stdout, first.stdout);
    // A file that is not a flashmoe profile is a clear error, not a silent cold start.
    let bad = run(s(&dir.join("config.json")));
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("config.json"), "{}", stderr(&bad));
}

#[test]
fn io_mmap_computes_on_the_mapped_files_with_the_same_text() {
    let dir = models_dir().join("qwen35-moe-tiny");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--model", s(&dir), "--prompt", "Hello there", "--max-tokens", "8", "--raw"];
        args.extend(["--temperature", "0", "--routing-profile", "off"]);
        args.extend(extra);
        flashmoe(&args)
    };
    let page = run(&["--io", "page"]);
    let mmap = run(&["--io", "mmap"]);
    assert!(page.status.success() && mmap.status.success(), "{}", stderr(&mmap));
    assert_eq!(page.stdout, mmap.stdout);
    let err = fails(&["run", "--model", s(&dir), "--prompt", "x", "--io", "mmap", "--ram-cache", "1M"]);
    assert!(err.contains("--io mmap") && err.contains("--ram-cache"), "{err}");
}

/// Runs `flashmoe ARGS` with stdout and stderr on a pseudo-terminal (script(1), util-linux) and
/// returns what the terminal received.
fn on_a_terminal(args: &[&str]) -> String {
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let cmd: Vec<String> =
        std::iter::once(env!("CARGO_BIN_EXE_flashmoe")).chain(args.iter().copied()).map(quote).collect();
    let o = Command::new("script")
        .args(["-qfec", &cmd.join(" "), "/dev/null"])
        .output()
        .expect("script(1) from util-linux runs commands on a pseudo-terminal");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn convert_shows_progress_on_a_terminal_only() {
    let tmp = tempfile::tempdir().unwrap();
    let src = models_dir().join("qwen35-moe-tiny");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let layers = config["text_config"]["num_hidden_layers"].as_u64().unwrap();
    // A pipe: the report only, exactly as without progress bars (no carriage returns, no
    // escape sequences, no bar text).
    let piped = tmp.path().join("piped");
    let o = flashmoe(&["convert", s(&src), s(&piped)]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.starts_with("requantization error (RMSE"), "{err}");
    assert!(!err.contains('\r') && !err.contains('\x1b') && !err.contains("layer 1/"), "{err}");
    assert!(err.lines().last().unwrap().starts_with(&format!("wrote {}", piped.display())), "{err}");
    // A terminal: the bar (label, bytes of the total, the layer being converted), then cleared
    // before the same report.
    let tty = on_a_terminal(&["convert", s(&src), s(&tmp.path().join("tty"))]);
    assert!(tty.contains("convert ") && tty.contains(" MiB/"), "{tty}");
    assert!((1..=layers).any(|i| tty.contains(&format!("layer {i}/{layers}"))), "{tty}");
    assert!(tty.contains("\x1b[2K") && tty.contains("requantization error (RMSE"), "{tty}");
    // --quiet: no bar on a terminal either.
    let quiet = on_a_terminal(&["convert", "--quiet", s(&src), s(&tmp.path().join("quiet"))]);
    assert!(!quiet.contains("layer 1/") && !quiet.contains("\x1b[2K"), "{quiet}");
    assert!(quiet.contains("requantization error (RMSE"), "{quiet}");
}

#[test]
fn serve_refuses_an_empty_api_key() {
    // `--api-key ""` (an unset variable in a script) must not silently mean "no key".
    let model = models_dir().join("qwen35-moe-tiny");
    let e = fails(&["serve", "--model", s(&model), "--api-key", "", "--port", "0"]);
    assert!(e.contains("--api-key is empty"), "{e}");
    let e = fails(&["serve", "--model", s(&model), "--api-key", "  ", "--port", "0"]);
    assert!(e.contains("--api-key is empty"), "{e}");
}
