//! Defaults users expect and paper cuts (issue 14): sampling defaults from the model's
//! generation_config.json, the output cap, `--seed`, `--prompt -`, `--threads`, unit-less sizes,
//! `--experts` above the model's k, token text in `tokenize`/`logits`, `info`'s dtypes and
//! context, `verify` on a non-packed folder, `chat` with no server.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models")
}

fn flashmoe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn summary(o: &Output) -> String {
    assert!(o.status.success(), "{}", stderr(o));
    stderr(o).lines().last().unwrap().to_string()
}

/// Runs a command that must fail cleanly and returns its one-line error.
fn fails(args: &[&str]) -> String {
    let o = flashmoe(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| !l.starts_with("[flashmoe] ")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: error should be one line: {err}");
    assert!(errors[0].starts_with("error: "), "{err}");
    errors[0].to_string()
}

/// A scratch copy of the flat fixture (random weights, no generation_config.json).
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(models_dir().join("qwen35-moe-tiny-flat")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    (tmp, dir)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn sampling_defaults_come_from_generation_config_and_flags_override() {
    let (_tmp, dir) = scratch();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--model", s(&dir), "--prompt", "Hello", "--raw", "--max-tokens", "4"];
        args.extend_from_slice(extra);
        summary(&flashmoe(&args))
    };
    // No generation_config.json: greedy, as transformers without one.
    assert!(run(&[]).contains("| sampler greedy (no generation_config.json) |"), "{}", run(&[]));
    // The values Qwen3.5 ships (testdata/generation) reach the sampler.
    std::fs::copy(
        models_dir().join("../generation/qwen3.5-generation_config.json"),
        dir.join("generation_config.json"),
    )
    .unwrap();
    let sm = run(&["--seed", "1"]);
    assert!(sm.contains("| sampler temp 0.6 top-p 0.95 top-k 20 seed 1 (generation_config.json) |"), "{sm}");
    let sm = run(&["--temperature", "0"]);
    assert!(sm.contains("| sampler greedy (generation_config.json and flags) |"), "{sm}");
    let sm = run(&["--top-k", "5", "--min-p", "0.1", "--repetition-penalty", "1.2"]);
    assert!(
        sm.contains("| sampler temp 0.6 top-p 0.95 top-k 5 min-p 0.1 repetition-penalty 1.2 (generation_config.json and flags) |"),
        "{sm}"
    );
    // do_sample false in the file: greedy.
    std::fs::write(dir.join("generation_config.json"), r#"{"do_sample": false, "temperature": 0.6}"#).unwrap();
    assert!(run(&[]).contains("| sampler greedy (generation_config.json) |"), "{}", run(&[]));
    // A malformed value is an error naming the file and the field.
    std::fs::write(dir.join("generation_config.json"), r#"{"temperature": "warm"}"#).unwrap();
    let e = fails(&["run", "--model", s(&dir), "--prompt", "Hello", "--max-tokens", "1"]);
    assert!(e.contains("generation_config.json") && e.contains("`temperature`"), "{e}");
}

#[test]
fn seed_makes_sampled_runs_reproducible() {
    let (_tmp, dir) = scratch();
    let text = |seed: &str| {
        let o = flashmoe(&[
            "run",
            "--model",
            s(&dir),
            "--prompt",
            "Hello there",
            "--raw",
            "--max-tokens",
            "24",
            "--temperature",
            "1.0",
            "--seed",
            seed,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let a = text("11");
    assert_eq!(a, text("11"), "same seed, different text");
    assert_ne!(a, text("12"), "different seeds, same text");
}

#[test]
fn run_caps_output_at_512_tokens_by_default() {
    // The built-in model on raw text writes on past 512 tokens (seeded: this seed meets no stop
    // token before then).
    let home = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["run", "--prompt", "The history of", "--raw", "--seed", "1"])
        .env("FLASHMOE_HOME", home.path())
        .output()
        .unwrap();
    let sm = summary(&o);
    assert!(sm.contains("(512 tok, default max tokens 512, --max-tokens N for more)"), "{sm}");
    // The built-in model's own generation_config.json (models/qwen35-moe-tiny-chat) sets the sampler;
    // the fields it lacks (no repetition penalty) take neutral values and are not named.
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen35-moe-tiny-chat/generation_config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut want = format!("| sampler temp {} top-p {} top-k {}", cfg["temperature"], cfg["top_p"], cfg["top_k"]);
    if let Some(r) = cfg.get("repetition_penalty") {
        want.push_str(&format!(" repetition-penalty {r}"));
    }
    want.push_str(" seed 1 (generation_config.json) |");
    assert!(sm.contains(&want), "{sm}\nwanted {want}");
    let (_tmp, dir) = scratch();
    let sm = summary(&flashmoe(&["run", "--model", s(&dir), "--prompt", "Hello", "--raw", "--max-tokens", "3"]));
    assert!(sm.contains("(3 tok, max tokens)"), "{sm}");
}

#[test]
fn prompt_from_stdin_equals_prompt_flag() {
    let (_tmp, dir) = scratch();
    let base = ["run", "--model", s(&dir), "--raw", "--max-tokens", "6", "--temperature", "0"];
    let flag = flashmoe(&[&base[..], &["--prompt", "Hello there"]].concat());
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args([&base[..], &["-p", "-"]].concat())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello there\n").unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(piped.status.success(), "{}", stderr(&piped));
    assert_eq!(piped.stdout, flag.stdout);
    let tokens = |o: &Output| summary(o).split(" tok |").next().unwrap().to_string();
    assert_eq!(tokens(&piped), tokens(&flag));
    // Empty stdin is refused.
    let o = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args([&base[..], &["--prompt", "-"]].concat())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("stdin was empty"), "{}", stderr(&o));
}

#[test]
fn threads_sets_the_compute_pool() {
    let (_tmp, dir) = scratch();
    for n in ["1", "3"] {
        let o = flashmoe(&["run", "--model", s(&dir), "--prompt", "hi", "--max-tokens", "1", "--threads", n]);
        assert!(stderr(&o).contains(&format!("| {n} CPU compute threads")), "{}", stderr(&o));
    }
    let o = flashmoe(&["run", "--model", s(&dir), "--prompt", "hi", "--threads", "0"]);
    assert!(!o.status.success() && stderr(&o).contains("--threads"), "{}", stderr(&o));
}

#[test]
fn sizes_need_a_unit() {
    let (_tmp, dir) = scratch();
    for flag in ["--ram-cache", "--memory-budget"] {
        let e = fails(&["run", "--model", s(&dir), "--prompt", "hi", flag, "4"]);
        assert!(e.contains(flag) && e.contains("no unit") && e.contains("4G"), "{e}");
    }
    // 0 needs no unit; explicit bytes are fine.
    let o = flashmoe(&["run", "--model", s(&dir), "--prompt", "hi", "--max-tokens", "1", "--ram-cache", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = flashmoe(&["run", "--model", s(&dir), "--prompt", "hi", "--max-tokens", "1", "--ram-cache", "65536B"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn experts_above_the_model_k_are_refused() {
    let (_tmp, dir) = scratch();
    let k = serde_json::from_str::<Value>(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
        ["num_experts_per_tok"]
        .as_u64()
        .unwrap();
    let e = fails(&["run", "--model", s(&dir), "--prompt", "hi", "--experts", &(k + 1).to_string()]);
    assert!(e.contains(&format!("the model's {k} experts per token")), "{e}");
    assert!(!e.contains("REDUCED"), "{e}");
}

/// The vocabulary string of every id, read from tokenizer.json itself (model vocab and added tokens).
fn vocab_strings(tokenizer_json: &Path) -> std::collections::HashMap<u64, String> {
    let tok: Value = serde_json::from_str(&std::fs::read_to_string(tokenizer_json).unwrap()).unwrap();
    let mut m: std::collections::HashMap<u64, String> =
        tok["model"]["vocab"].as_object().unwrap().iter().map(|(k, v)| (v.as_u64().unwrap(), k.clone())).collect();
    for t in tok["added_tokens"].as_array().unwrap() {
        m.insert(t["id"].as_u64().unwrap(), t["content"].as_str().unwrap().to_string());
    }
    m
}

#[test]
fn tokenize_and_logits_show_token_text() {
    let dir = models_dir().join("qwen35-moe-tiny-flat");
    let vocab = vocab_strings(&dir.join("tokenizer.json"));
    let o = flashmoe(&["tokenize", "--model", s(&dir), "--json", "--show-text", "Hello world, hi <|im_end|>"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<u64> = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let tokens: Vec<&str> = v["tokens"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert_eq!(ids.len(), tokens.len());
    assert!(tokens.contains(&"<|im_end|>"), "{tokens:?}");
    for (id, t) in ids.iter().zip(&tokens) {
        assert_eq!(vocab[id], *t, "id {id}");
    }
    // The text form: one `id<TAB>token` line per token.
    let o = flashmoe(&["tokenize", "--model", s(&dir), "--show-text", "Hello world"]);
    let lines: Vec<String> = String::from_utf8(o.stdout).unwrap().lines().map(str::to_string).collect();
    assert!(lines.iter().all(|l| {
        let (id, t) = l.split_once('\t').unwrap();
        vocab[&id.parse::<u64>().unwrap()] == t
    }));
    // logits --json --show-text: the input ids' strings.
    let o = flashmoe(&["logits", "--model", s(&dir), "--ids", "39,68,276", "--json", "--show-text"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let want: Vec<Value> = [39u64, 68, 276].iter().map(|i| Value::String(vocab[i].clone())).collect();
    assert_eq!(v["tokens"], Value::Array(want));
}

#[test]
fn info_shows_dtypes_bits_and_context() {
    for (name, experts) in
        [("qwen35-moe-tiny-flat", None), ("qwen35-moe-tiny-mlx4", Some("routed experts 4-bit affine (group"))]
    {
        let dir = models_dir().join(name);
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let o = flashmoe(&["info", "--model", s(&dir)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8(o.stdout).unwrap();
        let ctx = cfg["max_position_embeddings"].as_u64().or(cfg["text_config"]["max_position_embeddings"].as_u64());
        assert!(out.contains(&format!("context      {} tokens", ctx.unwrap())), "{out}");
        match experts {
            // MLX: bits and group size as config.json's quantization says.
            Some(want) => {
                let q = &cfg["quantization"];
                assert_eq!(q["bits"].as_u64(), Some(4), "{q}");
                assert!(out.contains(&format!("{want} {}", q["group_size"])), "{out}");
                // The routers' per-module override.
                let router = &q["language_model.model.layers.0.mlp.gate"];
                assert!(
                    out.contains(&format!("router {}-bit affine (group {}", router["bits"], router["group_size"])),
                    "{out}"
                );
            }
            None => {
                let dtype = cfg["torch_dtype"].as_str().or(cfg["dtype"].as_str()).unwrap_or("float32");
                let short = match dtype {
                    "float32" => "f32",
                    "bfloat16" => "bf16",
                    "float16" => "f16",
                    d => panic!("{d}"),
                };
                assert!(out.contains(&format!("routed experts {short}")), "{out}");
            }
        }
    }
}

#[test]
fn verify_names_what_a_non_packed_folder_is() {
    let hf = models_dir().join("qwen35-moe-tiny-flat");
    let e = fails(&["verify", s(&hf)]);
    assert!(
        e.contains("is a Hugging Face safetensors checkpoint, not a packed model") && e.contains("flashmoe convert"),
        "{e}"
    );
    let e = fails(&["verify", s(&models_dir().join("qwen35-moe-tiny-mlx4"))]);
    assert!(e.contains("is an MLX safetensors checkpoint"), "{e}");
}

#[test]
fn chat_without_a_server_says_how_to_start_one() {
    // A port that nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let o = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["chat", "--url", &url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("connection refused") && err.contains("flashmoe serve") && err.contains("flashmoe chat --model"),
        "{err}"
    );
}

#[test]
fn chat_keeps_conversations_in_flashmoe_home() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let script = tmp.path().join("script.json");
    std::fs::write(&script, r#"["Scripted fallback reply."]"#).unwrap();
    let serve_args = format!("--scripted-replies {}", script.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["chat", "--model", s(&models_dir().join("qwen35-moe-tiny")), "--serve-args", &serve_args])
        .env_remove("FLASHMOE_DATA")
        .env("FLASHMOE_HOME", &home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Not a terminal: the line editor reads lines; end of input ends the chat.
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let files: Vec<PathBuf> =
        std::fs::read_dir(home.join("conversations")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let messages: Vec<Value> =
        std::fs::read_to_string(&files[0]).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let pairs: Vec<(&str, &str)> =
        messages.iter().map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap_or(""))).collect();
    assert_eq!(pairs, [("user", "hello"), ("assistant", "Scripted fallback reply.")]);
}
