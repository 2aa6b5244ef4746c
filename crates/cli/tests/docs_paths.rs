//! Every repository path the README and the docs cite exists (issue 14: "every path the docs
//! cite present in the repo"). A path is a word starting with one of the repository's top-level
//! folders; a tree listing's relative paths are also looked up under each crate's `src/`.

use std::path::{Path, PathBuf};

const ROOTS: [&str; 8] = ["crates/", "scripts/", "docs/", "testdata/", "tests/", "models/", "fuzz/", ".ci/"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs"), root.join("scripts")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                files.push(p);
            }
        }
    }
    files
}

/// Words made of path characters that start with a top-level folder.
fn cited_paths(text: &str) -> Vec<String> {
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    text.split(|c: char| !is_path_char(c))
        .filter(|w| ROOTS.iter().any(|r| w.starts_with(r)))
        .map(|w| w.trim_end_matches(['.', '-']).to_string())
        // Placeholders in command templates (`fuzz/corpus/TARGET/`).
        .filter(|w| !w.split('/').any(|part| part.len() > 1 && part.chars().all(|c| c.is_ascii_uppercase())))
        .collect()
}

fn exists(root: &Path, p: &str) -> bool {
    if root.join(p).exists() {
        return true;
    }
    // Tree listings in docs/architecture.md name files relative to a crate's src/.
    std::fs::read_dir(root.join("crates")).unwrap().flatten().any(|c| c.path().join("src").join(p).exists())
}

#[test]
fn every_path_the_docs_cite_exists() {
    let root = repo();
    let mut missing = Vec::new();
    let mut checked = 0;
    for f in markdown_files(&root) {
        let text = std::fs::read_to_string(&f).unwrap();
        for p in cited_paths(&text) {
            checked += 1;
            if !exists(&root, &p) {
                missing.push(format!("{} cites {p}", f.strip_prefix(&root).unwrap_or(&f).display()));
            }
        }
    }
    assert!(checked > 100, "only {checked} cited paths found: is the scanner broken?");
    assert!(missing.is_empty(), "paths cited in the docs that do not exist:\n{}", missing.join("\n"));
}

#[test]
fn the_scanner_finds_paths_and_skips_placeholders() {
    let text = "see `crates/engine/src/lib.rs`, scripts/test.sh. and fuzz/corpus/TARGET/ or (docs/x.md)";
    assert_eq!(cited_paths(text), ["crates/engine/src/lib.rs", "scripts/test.sh", "docs/x.md"]);
}
