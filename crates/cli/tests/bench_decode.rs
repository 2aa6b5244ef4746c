//! `bench decode` on the CPU: each `--io` mode is the one the run reports (`--io mmap` once read
//! through the page cache while the flag said otherwise), the memory roofline line and the
//! per-layer breakdown of `--timing`.

use std::process::Command;

fn flashmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).output().unwrap()
}

/// A 2-layer random model of the tiny geometry in `parent`/tiny.
fn synth_tiny(parent: &std::path::Path) -> std::path::PathBuf {
    let dir = parent.join("tiny");
    let o = flashmoe(&["synth", "--geometry", "tiny", "--layers", "2", "--out", dir.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir
}

#[test]
fn bench_decode_cpu_reports_its_io_mode_roofline_and_timing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synth_tiny(tmp.path());
    let d = dir.to_str().unwrap();
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

/// `bench sweep` over RAM tier sizes writes one CSV row per size (the GPU columns empty on the
/// CPU) and a plot; `--gpu-caches` on the CPU is refused before anything runs.
#[test]
fn bench_sweep_writes_a_row_per_size_and_refuses_gpu_sizes_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synth_tiny(tmp.path());
    let d = dir.to_str().unwrap();
    let csv = tmp.path().join("sweep.csv");
    let svg = tmp.path().join("sweep.svg");
    let common =
        ["--model", d, "--device", "cpu", "--tokens", "3", "--warmup", "1", "--disk-bw", "1", "--threads", "2"];
    let mut args = vec!["bench", "sweep", "--ram-cache", "0,50%"];
    args.extend(common);
    args.extend(["--csv", csv.to_str().unwrap(), "--plot", svg.to_str().unwrap()]);
    let o = flashmoe(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[0], "cache_bytes");
    assert!(header.ends_with(&[
        "gpu_cache",
        "gpu_slots",
        "gpu_hit_rate",
        "cpu_experts_per_token",
        "pcie_experts_per_token"
    ]));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0][0], "0");
    assert!(rows[1][0].parse::<u64>().unwrap() > 0);
    for r in &rows {
        assert_eq!(r.len(), header.len(), "{text}");
        assert!(r[2].parse::<f64>().unwrap() > 0.0, "tok/s: {text}");
        assert!(r[header.len() - 5..].iter().all(|c| c.is_empty()), "GPU columns on the CPU: {text}");
    }
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));

    let mut args = vec!["bench", "sweep", "--ram-cache", "0", "--gpu-caches", "10%"];
    args.extend(common);
    let o = flashmoe(&args);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--gpu-caches sweeps the GPU's expert cache: add --device cuda")
    );
}
