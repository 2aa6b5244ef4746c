//! `bench decode` on the CPU: each `--io` mode is the one the run reports (`--io mmap` once read
//! through the page cache while the flag said otherwise), the memory roofline line and the
//! per-layer breakdown of `--timing`.

use std::process::Command;

fn flashmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).output().unwrap()
}

#[test]
fn bench_decode_cpu_reports_its_io_mode_roofline_and_timing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let d = dir.to_str().unwrap();
    let o = flashmoe(&["synth", "--geometry", "tiny", "--layers", "2", "--out", d, "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (io, disk_reads) in [("mmap", false), ("page", true)] {
        let o = flashmoe(&[
            "bench",
            "decode",
            "--model",
            d,
            "--device",
            "cpu",
            "--io",
            io,
            "--tokens",
            "4",
            "--warmup",
            "1",
            "--disk-bw",
            "1",
            "--timing",
            "--threads",
            "2",
        ]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{io}: {e}");
        let line = e.lines().find(|l| l.contains("bench decode |")).unwrap_or_else(|| panic!("{io}: {e}"));
        assert!(line.ends_with(&format!("| io {io}")), "{io}: {line}");
        // Page reads count the bytes they read; on the mappings nothing is read.
        assert_eq!(!line.contains("| disk 0 B/token |"), disk_reads, "{io}: {line}");
        let roof = e.lines().find(|l| l.contains("roofline:")).unwrap_or_else(|| panic!("{io}: {e}"));
        assert!(
            roof.contains("(memory read, 2 threads, measured now)") && roof.contains("% of the roofline"),
            "{roof}"
        );
        assert!(e.contains("per-layer time per decode token, ms (averaged over 4 tokens):"), "{io}: {e}");
        assert!(e.lines().any(|l| l.trim_start().starts_with("all ")), "{io}: {e}");
    }
}
