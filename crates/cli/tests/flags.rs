//! Flag validation (issue 13, class 7): sampling flags take the values the server's OpenAI
//! endpoints take (NaN, infinities, out-of-range values refused by the argument parser, before
//! any model is loaded), and every other number that could hang, panic or mean nothing is
//! refused the same way: a usage error naming the flag, exit status 2, never a panic.

use std::process::Command;

fn refused(args: &[&str], flag: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?} was not refused as a usage error: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let first = err.lines().next().unwrap_or("");
    assert!(first.starts_with("error: invalid value") && first.contains(flag), "{args:?}: {err}");
}

#[test]
fn sampling_flags_out_of_the_servers_ranges_are_refused() {
    // Each value is outside what /v1/chat/completions accepts (a repetition penalty of 0,
    // which the sampler would ignore, is refused by both).
    for (flag, values) in [
        ("--temperature", &["nan", "NaN", "inf", "-1", "2.5"][..]),
        ("--top-p", &["1.5", "nan", "-0.1", "inf"]),
        ("--top-k", &["-1", "1.5", "99999999999999999999"]),
        ("--min-p", &["-0.1", "2", "nan"]),
        ("--repetition-penalty", &["0", "-1", "nan", "11", "inf"]),
        ("--presence-penalty", &["-3", "3", "nan"]),
    ] {
        for v in values {
            refused(&["run", "--prompt", "hi", &format!("{flag}={v}")], flag);
        }
    }
}

#[test]
fn chat_timeouts_and_temperatures_must_be_finite_and_in_range() {
    for v in ["inf", "nan", "0", "-1", "1e300"] {
        refused(&["chat", &format!("--tool-timeout={v}")], "--tool-timeout");
    }
    for v in ["nan", "-1", "3", "inf"] {
        refused(&["chat", &format!("--temperature={v}")], "--temperature");
    }
}

#[test]
fn other_numeric_flags_are_bounded() {
    refused(&["routing-stats", "trace.json", "--half-life", "nan"], "--half-life");
    refused(&["routing-stats", "trace.json", "--half-life", "0"], "--half-life");
    refused(&["bench", "decode", "--disk-bw", "inf", "--model", "m"], "--disk-bw");
    refused(&["bench", "decode", "--disk-bw=-2", "--model", "m"], "--disk-bw");
    refused(&["ppl", "--file", "t.txt", "--window", "0"], "--window");
    refused(&["ppl", "--file", "t.txt", "--window", "1"], "--window");
    refused(&["run", "--prompt", "hi", "--threads", "0"], "--threads");
    refused(&["run", "--prompt", "hi", "--threads", "100000"], "--threads");
    refused(&["run", "--prompt", "hi", "--io-threads", "0"], "--io-threads");
}
