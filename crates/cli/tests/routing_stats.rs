//! `flashmoe routing-stats` end to end: the two-tier replay's flags, JSON and table, clear errors
//! for bad flags and traces, and a closed stdout (`| head -1`) as a normal end.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn flashmoe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).output().unwrap()
}

/// A trace of `layers` layers of 5 experts, one per token, cycling 0 1 2 3 4.
fn cyclic_trace(path: &Path, layers: usize, tokens: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    writeln!(f, r#"{{"flashmoe_routing_trace": 1, "num_layers": {layers}, "num_experts": 5, "top_k": 1}}"#).unwrap();
    for t in 0..tokens {
        let e: Vec<String> = (0..layers).map(|_| format!("[{}]", t % 5)).collect();
        writeln!(f, r#"{{"pos":{t},"experts":[{}]}}"#, e.join(",")).unwrap();
    }
}

fn fails(args: &[&str]) -> String {
    let o = flashmoe(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

#[test]
fn two_tier_replay_json_and_table() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("t.jsonl");
    cyclic_trace(&trace, 1, 30);
    let t = trace.to_str().unwrap();
    // Cross product: 2 GPU sizes × 1 RAM size; 100-byte experts.
    let o = flashmoe(&[
        "routing-stats",
        t,
        "--policies",
        "--json",
        "--gpu-cache",
        "400B,100B",
        "--ram-cache",
        "400B",
        "--expert-bytes",
        "100B",
        "--half-life",
        "0.01",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let tiers = v["tiers"].as_array().unwrap();
    assert_eq!(tiers.len(), 2);
    assert_eq!((tiers[0]["gpu_experts"].as_u64(), tiers[0]["ram_experts"].as_u64()), (Some(4), Some(4)));
    assert_eq!(tiers[1]["gpu_experts"].as_u64(), Some(1));
    let row = |i: usize, name: &str| {
        tiers[i]["rows"].as_array().unwrap().iter().find(|r| r["policy"] == name).cloned().unwrap()
    };
    // The cycle of 5 over tiers of 4 + 4 (hand-counted in crates/tools/tests/tiers.rs).
    assert_eq!(row(0, "inclusive")["disk_bytes"], 3000);
    assert_eq!(row(0, "exclusive")["disk_bytes"], 500);
    assert_eq!(row(0, "exclusive")["pcie_bytes"], 5600);
    assert_eq!(row(0, "exclusive+cpu")["pcie_bytes"], 400);
    assert_eq!(row(0, "inclusive")["disk_vs_optimum"], 6.0);
    assert_eq!(row(0, "optimum (Belady)")["disk_bytes"], 500);
    assert!(row(0, "optimum (Belady)")["pcie_bytes"].is_null());
    // The per-layer part is unchanged.
    assert_eq!(v["num_experts"], 5);
    assert!(v["policies"]["hit_rate"].is_array());

    let o = flashmoe(&[
        "routing-stats",
        t,
        "--policies",
        "--gpu-cache",
        "4.8K",
        "--ram-cache",
        "1K",
        "--expert-bytes",
        "100B",
    ]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("two-tier replay: GPU"), "{text}");
    assert!(text.contains("(49 experts)") && text.contains("(10 experts)"), "{text}");
    for name in [
        "inclusive",
        "exclusive+cpu, pre-warmed (profile = this trace)",
        "exclusive, pre-warmed (profile = first 25%)",
        "optimum (Belady), last 75%",
    ] {
        assert!(text.lines().any(|l| l.starts_with(name)), "no row {name}: {text}");
    }
    assert!(text.contains("1.00× opt"), "{text}");
    // Without the cache flags the output is the per-layer tables only.
    let o = flashmoe(&["routing-stats", t, "--policies"]);
    assert!(!String::from_utf8(o.stdout).unwrap().contains("two-tier"));
}

#[test]
fn two_tier_flags_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("t.jsonl");
    cyclic_trace(&trace, 2, 10);
    let t = trace.to_str().unwrap();
    let e = fails(&["routing-stats", t, "--policies", "--gpu-cache", "1G"]);
    assert!(e.contains("--expert-bytes"), "{e}");
    let e = fails(&["routing-stats", t, "--policies", "--gpu-cache", "1X", "--expert-bytes", "1M"]);
    assert!(e.contains("--gpu-cache") && e.contains("unknown unit"), "{e}");
    let e = fails(&["routing-stats", t, "--policies", "--ram-cache", "1G", "--expert-bytes", "0"]);
    assert!(e.contains("--expert-bytes"), "{e}");
    let e = fails(&["routing-stats", t, "--gpu-cache", "1G", "--expert-bytes", "1M"]);
    assert!(e.contains("--policies"), "{e}");
    // Out-of-range experts: a clear error naming the line.
    std::fs::write(&trace, "{\"flashmoe_routing_trace\": 1, \"num_layers\": 1, \"num_experts\": 4, \"top_k\": 1}\n{\"pos\":0,\"experts\":[[9]]}\n").unwrap();
    let e = fails(&["routing-stats", t, "--policies", "--gpu-cache", "1K", "--expert-bytes", "100B"]);
    assert!(e.contains("line 2") && e.contains("expert 9 out of range"), "{e}");
}

#[test]
fn a_closed_stdout_ends_quietly() {
    // 3,000 layers: far more output than a pipe buffers, so writes after `head -1` fail.
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("t.jsonl");
    cyclic_trace(&trace, 3000, 3);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["routing-stats", trace.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("3 tokens, 3000 layers"), "{first}");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.is_empty(), "{:?}: {err}", o.status);
}
