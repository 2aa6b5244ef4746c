//! Fault injection (issue 13, class 8): the binary killed with SIGKILL at points spread over a
//! convert and over the first run of the built-in model, a disk that fills during convert
//! (RLIMIT_FSIZE: writes fail as on a full disk), and bytes flipped in a packed model. After
//! each: no half-written output that passes for a model, the next command works, and a damaged
//! model is an error, never different text.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models").join(name)
}

fn flashmoe(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).env("FLASHMOE_HOME", home).output().unwrap()
}

/// Starts `args`, kills it with SIGKILL after `after`, and reaps it.
fn kill_after(args: &[&str], home: &Path, after: Duration) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(args)
        .env("FLASHMOE_HOME", home)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    c.kill().ok();
    c.wait().unwrap();
}

fn timed(args: &[&str], home: &Path) -> (Output, Duration) {
    let t0 = Instant::now();
    let o = flashmoe(args, home);
    (o, t0.elapsed())
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn convert_killed_at_any_point_leaves_no_model_and_reruns() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("qwen35-moe-tiny");
    let s = src.to_str().unwrap();
    let reference = tmp.path().join("reference");
    // Requantizing to 4 bits: the slowest convert of this fixture, so kills land inside it.
    let (o, full) = timed(&["convert", s, reference.to_str().unwrap(), "--expert-bits", "4"], tmp.path());
    ok(&o);
    for i in 0..6 {
        let dst = tmp.path().join(format!("out{i}"));
        let d = dst.to_str().unwrap();
        kill_after(&["convert", s, d, "--expert-bits", "4"], tmp.path(), full.mul_f64(0.05 + 0.18 * i as f64));
        // Killed before the final rename: no DST; after it: a complete model that verifies.
        if dst.exists() {
            ok(&flashmoe(&["verify", d], tmp.path()));
        }
        let partial = tmp.path().join(format!("out{i}.partial"));
        // A partial output never passes for a model, unless the kill landed after its last write
        // and before the rename: then it is the whole model, the same as the reference's.
        if partial.exists() {
            let o = flashmoe(&["verify", partial.to_str().unwrap()], tmp.path());
            if o.status.success() {
                let manifest = |d: &std::path::Path| std::fs::read(d.join("manifest.json")).unwrap();
                assert_eq!(
                    manifest(&partial),
                    manifest(&reference),
                    "a killed convert's partial output verifies as a model but is not the whole model"
                );
            }
        }
        // The rerun (forced when the killed one had finished) completes and verifies.
        let o = flashmoe(&["convert", s, d, "--expert-bits", "4", "--force"], tmp.path());
        ok(&o);
        ok(&flashmoe(&["verify", d], tmp.path()));
        assert!(!partial.exists(), "the rerun cleaned up the killed run's partial output");
    }
}

#[test]
fn first_run_killed_at_any_point_leaves_a_cache_the_next_run_uses() {
    let args = ["run", "--prompt", "The history of", "--raw", "--max-tokens", "8", "--temperature", "0"];
    let reference = tempfile::tempdir().unwrap();
    let (o, full) = timed(&args, reference.path());
    let want = ok(&o);
    for i in 0..5 {
        let home = tempfile::tempdir().unwrap();
        kill_after(&args, home.path(), full.mul_f64(0.05 + 0.2 * i as f64));
        let o = flashmoe(&args, home.path());
        assert_eq!(ok(&o), want, "kill {i}: the run after a killed first run gives the same text");
    }
}

#[test]
fn a_full_disk_during_convert_is_one_error_and_leaves_no_model() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("qwen35-moe-tiny");
    let dst = tmp.path().join("out");
    // Files may not grow past 256 KiB: the first larger write fails (EFBIG) as on a full disk.
    let mut c = Command::new(env!("CARGO_BIN_EXE_flashmoe"));
    c.args(["convert", src.to_str().unwrap(), dst.to_str().unwrap(), "--expert-bits", "keep"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 256 << 10, rlim_max: 256 << 10 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            // Without this the kernel kills the writer with SIGXFSZ; ignored, write() fails.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("File too large"), "{err}");
    assert!(!dst.exists(), "no destination after a failed convert");
    // With room again, the same command completes.
    ok(&flashmoe(&["convert", src.to_str().unwrap(), dst.to_str().unwrap(), "--expert-bits", "keep"], tmp.path()));
    ok(&flashmoe(&["verify", dst.to_str().unwrap()], tmp.path()));
}

/// A byte flipped anywhere in weights.bin or an expert file: the run fails naming the damaged
/// tensor or expert, or (a flip in alignment padding, which no computation reads) gives the
/// same text. Never different text.
#[test]
fn flipped_bytes_in_a_packed_model_are_an_error_never_other_text() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("qwen35-moe-tiny");
    let dst = tmp.path().join("p");
    let d = dst.to_str().unwrap();
    ok(&flashmoe(&["convert", src.to_str().unwrap(), d, "--expert-bits", "keep"], tmp.path()));
    let args = ["run", "--model", d, "--prompt", "hello world", "--raw", "--max-tokens", "6", "--temperature", "0"];
    let want = ok(&flashmoe(&args, tmp.path()));
    let mut files = vec![dst.join("weights.bin")];
    files.extend(std::fs::read_dir(dst.join("experts")).unwrap().map(|e| e.unwrap().path()));
    files.sort();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let (mut errors, mut same) = (0, 0);
    for (n, file) in files.iter().enumerate().filter(|(n, _)| n % 2 == 0) {
        let clean = std::fs::read(file).unwrap();
        for _ in 0..3 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (seed >> 11) as usize % clean.len();
            let mut bytes = clean.clone();
            bytes[at] ^= 1 << (seed % 8);
            std::fs::write(file, &bytes).unwrap();
            let o = flashmoe(&args, tmp.path());
            if o.status.success() {
                assert_eq!(String::from_utf8_lossy(&o.stdout), want, "{} byte {at}: different text", file.display());
                same += 1;
            } else {
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(err.contains("checksum") && !err.contains("panicked"), "file {n} byte {at}: {err}");
                errors += 1;
            }
        }
        std::fs::write(file, &clean).unwrap();
    }
    eprintln!("flipped bytes: {errors} errors naming the damage, {same} in padding (same text)");
    assert!(errors > 0);
}
