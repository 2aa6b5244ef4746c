//! The regression half of the fuzzing (docs/reliability.md, class 8): every committed input of
//! every fuzz target (fuzz/corpus/TARGET/: the seeds and the inputs fuzz runs once failed on)
//! through the targets' own bodies, on the stable toolchain. The fuzzing itself needs nightly
//! and cargo-fuzz: scripts/fuzz/run.sh.

#[allow(dead_code)]
#[path = "../../../fuzz/src/bodies.rs"]
mod bodies;

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

#[test]
fn every_committed_fuzz_input_runs_clean() {
    let mut total = 0;
    for (target, body) in bodies::TARGETS {
        let dir = corpus_dir(target);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{target}: no committed inputs in {}", dir.display());
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            let run = std::panic::catch_unwind(|| body(&data));
            assert!(run.is_ok(), "{target}: {} panicked", input.display());
        }
        eprintln!("{target}: {} inputs", inputs.len());
        total += inputs.len();
    }
    assert!(total >= 7 * 3, "only {total} inputs in all");
}
