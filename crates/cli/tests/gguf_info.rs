//! `flashmoe info --model FILE.gguf` on the gguf-py fixtures (scripts/fixtures/gguf_files.py):
//! the summary shows what the script wrote, and a hostile file ends in one error line.

use std::path::PathBuf;
use std::process::Command;

fn info(file: &str) -> std::process::Output {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/gguf").join(file);
    Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(["info", "--model"]).arg(path).output().unwrap()
}

#[test]
fn info_summarises_a_gguf_model() {
    let out = info("qwen35moe-tiny.gguf");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("GGUF architecture `qwen35moe`): Qwen3.5 tiny test"), "{s}");
    assert!(s.contains("file type    Q4_K_M"), "{s}");
    assert!(s.contains("layers       4 (3 GatedDeltaNet + 1 full attention) + 1 MTP"), "{s}");
    // The script wrote 6 F16, 34 F32, 13 Q4_K, 4 Q5_K, 2 Q6_K and 21 Q8_0 tensors.
    assert!(s.contains("tensors      80: F16 6 "), "{s}");
    assert!(s.contains("Q4_K 13 ") && s.contains("Q5_K 4 ") && s.contains("Q6_K 2 ") && s.contains("Q8_0 21 "), "{s}");
    // Per expert: gate and up Q4_K (32 rows × 144 B), down Q8_0 (256 rows × 34 B) = 17,920 B.
    assert!(s.contains("expert bytes 17.5 KiB per expert"), "{s}");

    let out = info("qwen3next-tiny-00001-of-00002.gguf");
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("part 2/2") && s.contains("(31 tensors"), "{s}");
}

#[test]
fn info_on_a_hostile_gguf_is_one_error_line() {
    let out = info("string-2e60.gguf");
    assert!(!out.status.success());
    let e = String::from_utf8(out.stderr).unwrap();
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(
        e.contains(
            "string-2e60.gguf: GGUF: value of `test.string` (string) at byte 274 has length 1152921504606846976"
        ),
        "{e}"
    );
}

fn run_gguf(rel: &str) -> std::process::Output {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/gguf").join(rel);
    Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["run", "--prompt", "hi", "--max-tokens", "6", "--temperature", "0", "--model"])
        .arg(&path)
        .output()
        .unwrap()
}

#[test]
fn running_a_gguf_of_llama_cpp_quants_generates() {
    // llama.cpp's converter + llama-quantize Q4_K_M (scripts/fixtures/gguf_models.py).
    let out = run_gguf("models/qwen35moe-k256-Q4_K_M.gguf");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    // `--io auto` on the CPU, no RAM tier: the experts fit in memory, so they are computed in
    // place on the mapped file.
    assert!(e.contains("experts: io auto: computed in place on the mapped files ("), "{e}");
    assert!(e.contains("decode") && e.contains("(6 tok, max tokens)"), "{e}");
    assert!(e.contains("sampler greedy (flags)"), "{e}");
}

#[test]
fn a_gguf_with_impossible_values_is_one_error_line() {
    // Random bytes where llama.cpp's converter writes −exp(A_log): a positive value is no model.
    let out = run_gguf("qwen35moe-tiny.gguf");
    assert!(!out.status.success());
    let e = String::from_utf8(out.stderr).unwrap();
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains("tensor `blk.0.ssm_a`") && e.contains("−exp(A_log) is always negative"), "{e}");
}

fn flashmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashmoe")).args(args).output().unwrap()
}

#[test]
fn convert_a_gguf_verify_it_and_run_it_like_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/gguf/models/qwen35moe-k256-Q4_K_M.gguf");
    let (src_s, dst) = (src.to_str().unwrap(), tmp.path().join("packed"));
    let dst_s = dst.to_str().unwrap();
    let o = flashmoe(&["convert", src_s, dst_s]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && e.contains("wrote ") && !e.contains("requantization"), "{e}");
    let o = flashmoe(&["verify", dst_s]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok: "), "{}", String::from_utf8_lossy(&o.stderr));
    // The same blocks and kernels: the same greedy text, experts mapped or streamed.
    for io in ["auto", "page"] {
        let run = |model: &str| {
            let o = flashmoe(&[
                "run",
                "--model",
                model,
                "--prompt",
                "hi",
                "--max-tokens",
                "8",
                "--temperature",
                "0",
                "--io",
                io,
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            o.stdout
        };
        assert_eq!(run(src_s), run(dst_s), "--io {io}");
    }
    // Requantizing is not offered; a truncated file is one error line and leaves nothing.
    let o = flashmoe(&["convert", src_s, tmp.path().join("q").to_str().unwrap(), "--expert-bits", "4"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.trim_end().lines().count() == 1 && e.contains("as they are"), "{e}");
    let truncated = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("cut");
    let o = flashmoe(&["convert", truncated.to_str().unwrap(), out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.trim_end().lines().count() == 1 && e.contains("cut.gguf"), "{e}");
    assert!(!out.exists() && !tmp.path().join("cut.partial").exists());
}
