//! The regression half of the `api_request` fuzz target (docs/reliability.md, class 8): every
//! committed input (fuzz/corpus/api_request/: the seeds and any input a fuzz run once failed on)
//! through the target's own body on the stable toolchain, and the seeds' verdicts checked, so
//! the corpus keeps reaching past the JSON parse into validation, rendering and grammars.

#[allow(dead_code)]
#[path = "../../../fuzz/src/api_bodies.rs"]
mod api_bodies;

use std::path::PathBuf;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/api_request");
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn every_committed_api_request_input_runs_clean() {
    let inputs = corpus();
    assert!(inputs.len() >= 6, "only {} inputs", inputs.len());
    for (name, data) in &inputs {
        let run = std::panic::catch_unwind(|| api_bodies::api_request(data));
        assert!(run.is_ok(), "{name} panicked");
    }
}

/// The seeds named `ok-*` are valid requests (they reach the end of the check), `bad-*` are
/// refused with a client error: the corpus exercises both.
#[test]
fn the_seeds_are_what_their_names_say() {
    let engine = flashmoe::generate::Engine::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen35-moe-tiny-trained"),
    )
    .unwrap();
    let check = flashmoe_server::RequestCheck::new(std::sync::Arc::new(engine));
    for (name, data) in corpus() {
        let (&first, body) = data.split_first().unwrap();
        let path = api_bodies::PATHS[first as usize % api_bodies::PATHS.len()];
        let verdict = check.check(path, body);
        if name.starts_with("ok-") {
            assert!(verdict.is_ok(), "{name} ({path}): {verdict:?}");
        } else if name.starts_with("bad-") {
            let e = verdict.expect_err(&name);
            assert!(e.contains("error"), "{name}: {e}");
        }
    }
}
