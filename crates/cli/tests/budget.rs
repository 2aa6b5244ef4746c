//! Streaming under a memory budget: a model whose experts are several times larger than the
//! budget runs with output identical to an unconstrained run, and peak RSS stays under the budget.

use std::path::PathBuf;
use std::process::Command;

fn flashmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).output().unwrap()
}

fn peak_rss_mib(summary: &str) -> f64 {
    let s = summary.split("peak RSS ").nth(1).expect("summary has peak RSS");
    let mut it = s.split_whitespace();
    let v: f64 = it.next().unwrap().parse().unwrap();
    match it.next().unwrap() {
        "KiB" => v / 1024.0,
        "MiB" => v,
        "GiB" => v * 1024.0,
        u => panic!("unit {u}"),
    }
}

/// One layer of the Qwen3.5-35B-A3B geometry with 512 experts (864 MiB of experts) and the given
/// vocabulary, written under `tmp` with the tiny fixture's tokenizer.
fn synth_one_layer(tmp: &std::path::Path, vocab: usize) -> PathBuf {
    let dir = tmp.join("synth35");
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen35-moe-tiny");
    let vocab = vocab.to_string();
    let o = flashmoe(&[
        "synth",
        "--geometry",
        "qwen3.5-35b-a3b",
        "--layers",
        "1",
        "--vocab",
        &vocab,
        "--experts",
        "512",
        "--tokenizer-from",
        tok.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir
}

#[test]
fn experts_four_times_the_budget_stream_with_identical_output_and_bounded_rss() {
    let tmp = tempfile::tempdir().unwrap();
    // One layer of the real Qwen3.5-35B-A3B geometry with 512 experts of 1.7 MiB = 864 MiB of experts.
    let dir = synth_one_layer(tmp.path(), 1024);
    let d = dir.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args =
            vec!["run", "--model", d, "--prompt", "streaming experts from disk", "--raw", "--max-tokens", "24"];
        args.extend_from_slice(extra);
        let o = flashmoe(&args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        (o.stdout, err)
    };
    let (free_out, _) = run(&["--io", "page"]);
    let budget_mib = 128.0;
    for io in ["direct", "page"] {
        let (out, err) = run(&["--io", io, "--memory-budget", "128M", "--io-threads", "4"]);
        assert_eq!(out, free_out, "--io {io}: output under the budget differs");
        assert!(err.contains("[flashmoe] plan: budget 128.0 MiB"), "{err}");
        let summary = err.lines().last().unwrap();
        let rss = peak_rss_mib(summary);
        eprintln!("--io {io}: peak RSS {rss:.1} MiB under a {budget_mib} MiB budget; experts 864 MiB: {summary}");
        assert!(rss <= budget_mib, "--io {io}: peak RSS {rss} MiB exceeds the budget: {summary}");
        assert!(864.0 >= 4.0 * budget_mib);
    }
}

/// `ppl` holds a whole window of logits (window × vocab × 4 bytes) besides what `run` holds:
/// the plan counts it, so peak RSS stays under the budget with the RAM cache filled (it went
/// over by the window's logits before).
#[test]
fn ppl_stays_under_the_budget_with_its_logits_window() {
    let tmp = tempfile::tempdir().unwrap();
    // 512 experts of 1.7 MiB (864 MiB) and a 32k vocabulary: a 512-token window of logits is 64 MiB.
    let dir = synth_one_layer(tmp.path(), 32768);
    let text = tmp.path().join("text.txt");
    let words: Vec<String> = (0..1500).map(|i| format!("word{} and", i % 97)).collect();
    std::fs::write(&text, words.join(" ")).unwrap();
    let budget_mib = 400.0;
    let o = flashmoe(&[
        "ppl",
        "--model",
        dir.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--window",
        "512",
        "--max-tokens",
        "1024",
        "--io",
        "page",
        "--memory-budget",
        "400M",
        "--io-threads",
        "4",
    ]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{err}");
    let rss = peak_rss_mib(&out);
    eprintln!("ppl: peak RSS {rss:.1} MiB under a {budget_mib} MiB budget: {out}{err}");
    assert!(err.contains("[flashmoe] plan: budget 400.0 MiB"), "{err}");
    assert!(rss <= budget_mib, "peak RSS {rss} MiB exceeds the budget: {out}");
}
