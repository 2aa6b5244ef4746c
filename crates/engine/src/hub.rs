//! Model references as users type them, and the Hugging Face cache they point into.
//!
//! `--model` takes a local path (a model folder, a `.gguf` file or the first part of a split
//! GGUF), `builtin`, or a Hub repo: `OWNER/NAME[@REVISION][:QUANT]`. A repo is looked up in the
//! Hugging Face cache the way `huggingface_hub` lays it out (`models--OWNER--NAME/refs/<rev>`
//! holds the commit, `snapshots/<commit>/` the files, linked to `blobs/`), so models fetched by
//! `huggingface-cli download`, `hf_hub_download` or `flashmoe pull` are found without a path.
//! Nothing here touches the network.

use crate::error::{Error, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The name of the model embedded in the binary, accepted by every `--model`.
pub const BUILTIN: &str = "builtin";

/// What a `--model` value names, before anything is looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRef {
    Builtin,
    Path(PathBuf),
    /// `OWNER/NAME[@REVISION][:QUANT]`; `revision` None means `main`.
    Hub {
        repo: String,
        revision: Option<String>,
        quant: Option<String>,
    },
}

/// Where the Hugging Face cache is and which setting chose it (for error messages).
#[derive(Clone, Debug)]
pub struct HubCache {
    pub cache: Cache,
    pub chosen_by: &'static str,
}

impl HubCache {
    /// The cache `huggingface_hub` uses: $HF_HUB_CACHE, else $HF_HOME/hub, else
    /// $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. (hf-hub's own
    /// `Cache::from_env` knows HF_HOME only, and panics without a home folder.)
    pub fn from_env() -> HubCache {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let (path, chosen_by) = if let Some(p) = var("HF_HUB_CACHE") {
            (p, "HF_HUB_CACHE")
        } else if let Some(p) = var("HF_HOME") {
            (p.join("hub"), "HF_HOME")
        } else if let Some(p) = var("XDG_CACHE_HOME") {
            (p.join("huggingface").join("hub"), "XDG_CACHE_HOME")
        } else if let Some(h) = var("HOME") {
            (h.join(".cache").join("huggingface").join("hub"), "the default")
        } else {
            (std::env::temp_dir().join("huggingface").join("hub"), "no HOME: a temporary folder")
        };
        HubCache { cache: Cache::new(path), chosen_by }
    }

    pub fn path(&self) -> &Path {
        self.cache.path()
    }

    /// "DIR (from HF_HUB_CACHE)": where a lookup looked.
    pub fn describe(&self) -> String {
        format!("{} (from {})", self.path().display(), self.chosen_by)
    }

    /// The cache folder of a model repo: `models--OWNER--NAME`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.path().join(Repo::new(repo.to_string(), RepoType::Model).folder_name())
    }
}

impl ModelRef {
    /// Reads a `--model` value. An existing path always wins (so a folder named like a repo is
    /// used as a folder); `builtin` is the embedded model; `OWNER/NAME…` a Hub repo; anything
    /// else a path (whose absence the loader reports).
    pub fn parse(s: &str) -> ModelRef {
        if s == BUILTIN {
            return ModelRef::Builtin;
        }
        let p = Path::new(s);
        if p.exists() {
            return ModelRef::Path(p.to_path_buf());
        }
        parse_repo_ref(s).unwrap_or_else(|| ModelRef::Path(p.to_path_buf()))
    }

    /// `OWNER/NAME[@REVISION][:QUANT]` only (no path, no `builtin`): what `pull` takes.
    pub fn parse_hub(s: &str) -> Option<ModelRef> {
        parse_repo_ref(s)
    }
}

/// `OWNER/NAME[@REVISION][:QUANT]` when `s` has that shape (Hub naming rules: letters, digits,
/// `-`, `_`, `.`; no `--` or `..`; not starting or ending with `-` or `.`).
fn parse_repo_ref(s: &str) -> Option<ModelRef> {
    let (rest, quant) = match s.rsplit_once(':') {
        Some((r, q)) if !q.is_empty() && q.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) => {
            (r, Some(q.to_string()))
        }
        Some(_) => return None,
        None => (s, None),
    };
    let (repo, revision) = match rest.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
        Some(_) => return None,
        None => (rest, None),
    };
    let (owner, name) = repo.split_once('/')?;
    (valid_repo_part(owner) && valid_repo_part(name)).then(|| ModelRef::Hub { repo: repo.to_string(), revision, quant })
}

fn valid_repo_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !s.contains("--")
        && !s.contains("..")
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

/// A resolved model: the folder (or first GGUF file) to load and the name to show and serve.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub path: PathBuf,
    pub name: String,
}

/// Resolves a local path: a folder as is; a `.gguf` file, or any part of a split GGUF, as the
/// first part (all parts must be there).
pub fn resolve_path(p: &Path) -> Result<Resolved> {
    let name = |p: &Path| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
    if p.is_dir() || !p.exists() {
        // A missing path is left to the loader, whose error names the file it wanted.
        let canon = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        return Ok(Resolved { path: p.to_path_buf(), name: name(&canon) });
    }
    let file = name(p);
    if !file.to_ascii_lowercase().ends_with(".gguf") {
        return Err(Error::file(p, "is a file; --model takes a model folder, a .gguf file or a Hub repo (OWNER/NAME)"));
    }
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let group = GgufFile::parse(&file);
    let first = match group.split {
        Some((_, n)) => {
            check_parts(dir, &group.stem, n)?;
            dir.join(split_name(&group.stem, 1, n))
        }
        None => p.to_path_buf(),
    };
    Ok(Resolved { path: first, name: group.stem.trim_end_matches(".gguf").to_string() })
}

/// Resolves `OWNER/NAME[@REVISION][:QUANT]` in the Hugging Face cache.
pub fn resolve_hub(hub: &HubCache, repo: &str, revision: Option<&str>, quant: Option<&str>) -> Result<Resolved> {
    let snapshot = snapshot_dir(hub, repo, revision)?;
    let ggufs = gguf_groups(&snapshot);
    let mut name = repo.to_string();
    let path = match quant {
        Some(q) => {
            let g = pick_quant(&ggufs, q).map_err(|msg| Error::input(format!("{repo}:{q}: {msg}")))?;
            name = format!("{repo}:{q}");
            g.first_part(&snapshot)?
        }
        None if snapshot.join("config.json").exists() || snapshot.join(crate::packed::MANIFEST).exists() => {
            snapshot.clone()
        }
        None if ggufs.len() == 1 => {
            let g = &ggufs[0];
            if let Some(q) = &g.quant {
                name = format!("{repo}:{q}");
            }
            g.first_part(&snapshot)?
        }
        None if ggufs.len() > 1 => {
            return Err(Error::input(format!(
                "{repo} holds {} GGUF files: pick one with {repo}:QUANT ({})",
                ggufs.len(),
                describe_groups(&ggufs)
            )));
        }
        None => {
            return Err(Error::file(
                &snapshot,
                format!(
                    "{repo}: the cached snapshot has no config.json and no .gguf file (an incomplete download? `flashmoe pull {repo}`)"
                ),
            ));
        }
    };
    if let Some(rev) = revision {
        name = name.replacen(repo, &format!("{repo}@{rev}"), 1);
    }
    Ok(Resolved { path, name })
}

/// The snapshot folder a revision (default `main`) points at.
pub fn snapshot_dir(hub: &HubCache, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let rev = revision.unwrap_or("main");
    let dir = hub.repo_dir(repo);
    let pull = |extra: &str| format!("`flashmoe pull {repo}{extra}`");
    if !dir.is_dir() {
        return Err(Error::input(format!(
            "{repo}: not a local path and not in the Hugging Face cache (looked for {} in {}); download it with {}",
            dir.file_name().unwrap_or_default().to_string_lossy(),
            hub.describe(),
            pull(&revision.map(|r| format!(" --revision {r}")).unwrap_or_default())
        )));
    }
    let cache_repo = hub.cache.repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev.to_string()));
    let ref_file = dir.join("refs").join(rev);
    let commit = match flashmoe_text::file::read_text(&ref_file) {
        Ok(c) => c.trim().to_string(),
        // A commit hash given as the revision names its snapshot directly.
        Err(_) if dir.join("snapshots").join(rev).is_dir() => rev.to_string(),
        Err(_) => {
            let refs = list_names(&dir.join("refs"));
            let snaps = list_names(&dir.join("snapshots"));
            return Err(Error::input(format!(
                "{repo}: revision `{rev}` is not in the Hugging Face cache at {} (refs: {}; snapshots: {}); download it with {}",
                dir.display(),
                if refs.is_empty() { "none".into() } else { refs.join(", ") },
                if snaps.is_empty() { "none".into() } else { snaps.join(", ") },
                pull(&format!(" --revision {rev}"))
            )));
        }
    };
    let snapshot = cache_repo.pointer_path(&commit);
    if !snapshot.is_dir() {
        return Err(Error::file(
            &snapshot,
            format!(
                "{repo}: refs/{rev} points at commit {commit}, whose snapshot folder is missing; download it again with {}",
                pull("")
            ),
        ));
    }
    Ok(snapshot)
}

fn list_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// One GGUF file name taken apart: `stem` without the split suffix, the split `(part, of)`, and
/// the quantization label (`Q4_K_M`, `UD-Q4_K_XL`, `BF16`) when the name carries one.
#[derive(Clone, Debug, PartialEq, Eq)]
struct GgufFile {
    stem: String,
    split: Option<(u32, u32)>,
}

impl GgufFile {
    fn parse(file_name: &str) -> GgufFile {
        // llama.cpp's split naming: NAME-00001-of-00003.gguf.
        let lower = file_name.to_ascii_lowercase();
        if let Some(base) = lower.strip_suffix(".gguf")
            && base.len() > 15
        {
            let tail = &base[base.len() - 15..];
            let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
            if tail.starts_with('-')
                && &tail[6..10] == "-of-"
                && digits(&tail[1..6])
                && digits(&tail[10..15])
                && let (Ok(k), Ok(n)) = (tail[1..6].parse::<u32>(), tail[10..15].parse::<u32>())
            {
                let stem = format!("{}.gguf", &file_name[..base.len() - 15]);
                return GgufFile { stem, split: Some((k, n)) };
            }
        }
        GgufFile { stem: file_name.to_string(), split: None }
    }
}

fn split_name(stem: &str, k: u32, n: u32) -> String {
    let base = &stem[..stem.len() - ".gguf".len()];
    format!("{base}-{k:05}-of-{n:05}.gguf")
}

fn check_parts(dir: &Path, stem: &str, n: u32) -> Result<()> {
    let missing: Vec<String> = (1..=n).map(|k| split_name(stem, k, n)).filter(|f| !dir.join(f).is_file()).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::file(dir, format!("split GGUF {stem} is missing part(s): {}", missing.join(", "))))
    }
}

/// The quantization label in a GGUF file name: the last `-`/`.`-separated token shaped like a
/// llama.cpp type (Q4_K_M, IQ2_XXS, Q8_0, TQ1_0, BF16, F16, F32, MXFP4), with a `UD-` prefix
/// (unsloth's dynamic quants) kept.
pub fn quant_label(file_name: &str) -> Option<String> {
    let stem = GgufFile::parse(file_name).stem;
    let base = stem.strip_suffix(".gguf").or_else(|| stem.strip_suffix(".GGUF")).unwrap_or(&stem);
    let tokens: Vec<&str> = base.split(['-', '.']).collect();
    let is_quant = |t: &str| {
        let u = t.to_ascii_uppercase();
        let after = u.strip_prefix("IQ").or_else(|| u.strip_prefix("TQ")).or_else(|| u.strip_prefix('Q'));
        matches!(u.as_str(), "BF16" | "F16" | "F32" | "FP16" | "FP32" | "MXFP4" | "MXFP4_MOE")
            || after.is_some_and(|a| {
                a.starts_with(|c: char| c.is_ascii_digit()) && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
    };
    let i = tokens.iter().rposition(|t| is_quant(t))?;
    let label = tokens[i].to_string();
    Some(if i > 0 && tokens[i - 1].eq_ignore_ascii_case("UD") { format!("{}-{label}", tokens[i - 1]) } else { label })
}

/// The GGUF files of a snapshot grouped into models (the parts of a split file together),
/// without vision projectors (`mmproj`).
#[derive(Clone, Debug)]
pub struct GgufGroup {
    /// Path relative to the snapshot, without the split suffix.
    pub stem: String,
    pub parts: u32,
    pub quant: Option<String>,
    /// Relative paths of the files present.
    pub files: Vec<String>,
}

impl GgufGroup {
    /// The file to load: the file, or the first part after checking every part is there.
    pub fn first_part(&self, snapshot: &Path) -> Result<PathBuf> {
        if self.parts <= 1 {
            return Ok(snapshot.join(&self.stem));
        }
        let stem_path = snapshot.join(&self.stem);
        let dir = stem_path.parent().unwrap_or(snapshot);
        let stem_name = stem_path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        check_parts(dir, &stem_name, self.parts)?;
        Ok(dir.join(split_name(&stem_name, 1, self.parts)))
    }
}

/// The GGUF models under `snapshot` (searched recursively: repos put split quants in folders).
pub fn gguf_groups(snapshot: &Path) -> Vec<GgufGroup> {
    let mut files = Vec::new();
    collect_files(snapshot, snapshot, &mut files, 0);
    gguf_groups_of(files)
}

/// The GGUF models among relative file paths (`/`-separated), e.g. a Hub repo's file list.
pub fn gguf_groups_of(files: impl IntoIterator<Item = String>) -> Vec<GgufGroup> {
    let mut groups: BTreeMap<String, GgufGroup> = BTreeMap::new();
    for rel in files {
        let file_name = rel.rsplit('/').next().unwrap_or(&rel).to_string();
        if !file_name.to_ascii_lowercase().ends_with(".gguf") || file_name.to_ascii_lowercase().contains("mmproj") {
            continue;
        }
        let g = GgufFile::parse(&file_name);
        let prefix = &rel[..rel.len() - file_name.len()];
        let stem = format!("{prefix}{}", g.stem);
        let entry = groups.entry(stem.clone()).or_insert_with(|| GgufGroup {
            stem,
            parts: g.split.map_or(1, |(_, n)| n),
            quant: quant_label(&file_name),
            files: Vec::new(),
        });
        entry.files.push(rel.clone());
    }
    groups.into_values().collect()
}

/// Relative paths (with `/`) of the files under `dir`, symlinks followed.
fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            collect_files(root, &p, out, depth + 1);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// The group whose quant label is `q` (case-insensitive); failing that, the groups whose name
/// contains `q` as a whole `-`/`.`/`/`-separated part. Exactly one must match.
pub fn pick_quant<'g>(groups: &'g [GgufGroup], q: &str) -> std::result::Result<&'g GgufGroup, String> {
    if groups.is_empty() {
        return Err("the cached snapshot has no .gguf file".into());
    }
    let by_label: Vec<&GgufGroup> =
        groups.iter().filter(|g| g.quant.as_deref().is_some_and(|l| l.eq_ignore_ascii_case(q))).collect();
    let matches =
        if by_label.is_empty() { groups.iter().filter(|g| contains_part(&g.stem, q)).collect() } else { by_label };
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no GGUF file of that quantization (cached: {})", describe_groups(groups))),
        many => Err(format!(
            "{} GGUF files match: {} (name the file, or a longer tag)",
            many.len(),
            many.iter().map(|g| g.stem.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn contains_part(stem: &str, q: &str) -> bool {
    let s = stem.to_ascii_lowercase();
    let q = q.to_ascii_lowercase();
    let boundary = |c: Option<char>| c.is_none_or(|c| "-./".contains(c));
    s.match_indices(&q).any(|(i, _)| boundary(s[..i].chars().next_back()) && boundary(s[i + q.len()..].chars().next()))
}

pub fn describe_groups(groups: &[GgufGroup]) -> String {
    groups
        .iter()
        .map(|g| match &g.quant {
            Some(q) => format!("{q} = {}", g.stem),
            None => g.stem.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One model repo of the Hugging Face cache, by snapshot.
#[derive(Clone, Debug)]
pub struct CachedRepo {
    pub repo: String,
    pub dir: PathBuf,
    /// Bytes of the distinct files the snapshots point at (what `huggingface_hub`'s
    /// `scan_cache_dir` reports as `size_on_disk`).
    pub size_on_disk: u64,
    pub snapshots: Vec<CachedSnapshot>,
    /// Downloads left unfinished in `blobs/` (`.part`: hf-hub, flashmoe; `.incomplete`:
    /// huggingface_hub).
    pub partial_blobs: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct CachedSnapshot {
    pub commit: String,
    /// The refs (branches, tags) pointing at this commit.
    pub refs: Vec<String>,
    pub path: PathBuf,
    /// Bytes of this snapshot's files.
    pub size_on_disk: u64,
    /// Relative paths (`/`-separated) of the files present.
    pub files: Vec<String>,
    /// Files whose link points at a blob that is not there.
    pub broken_files: Vec<String>,
}

/// The model repos of the Hugging Face cache, and the entries skipped (with why).
pub fn scan(hub: &HubCache) -> (Vec<CachedRepo>, Vec<(PathBuf, String)>) {
    let mut repos = Vec::new();
    let mut skipped = Vec::new();
    let Ok(rd) = std::fs::read_dir(hub.path()) else { return (repos, skipped) };
    let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for dir in entries {
        let folder = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let Some(id) = folder.strip_prefix("models--") else { continue };
        if !dir.is_dir() {
            continue;
        }
        let repo = id.replace("--", "/");
        let refs: Vec<(String, String)> = collect_refs(&dir.join("refs"));
        let mut snapshots = Vec::new();
        let mut seen = HashSet::new();
        let mut size_on_disk = 0u64;
        for commit in list_names(&dir.join("snapshots")) {
            let path = dir.join("snapshots").join(&commit);
            let mut files = Vec::new();
            collect_files(&path, &path, &mut files, 0);
            let mut broken_files = Vec::new();
            // Broken links are not listed by collect_files (is_dir/metadata follow them): find them
            // with symlink_metadata.
            find_broken(&path, &path, &mut broken_files, 0);
            let mut snapshot_size = 0u64;
            for f in &files {
                let p = path.join(f);
                if let (Ok(real), Ok(md)) = (p.canonicalize(), std::fs::metadata(&p)) {
                    snapshot_size += md.len();
                    if seen.insert(real) {
                        size_on_disk += md.len();
                    }
                }
            }
            let refs_here = refs.iter().filter(|(_, c)| *c == commit).map(|(r, _)| r.clone()).collect();
            snapshots.push(CachedSnapshot {
                commit,
                refs: refs_here,
                path,
                size_on_disk: snapshot_size,
                files,
                broken_files,
            });
        }
        if snapshots.is_empty() {
            skipped.push((dir.clone(), "no snapshot (an interrupted download?)".into()));
            continue;
        }
        let partial_blobs = list_names(&dir.join("blobs"))
            .into_iter()
            .filter(|n| n.ends_with(".part") || n.ends_with(".incomplete"))
            .collect();
        repos.push(CachedRepo { repo, dir, size_on_disk, snapshots, partial_blobs });
    }
    (repos, skipped)
}

/// A model folder's format in words: `flashmoe packed`, `MLX 4-bit`, `safetensors bf16`.
pub fn folder_format(dir: &Path) -> String {
    if dir.join(crate::packed::MANIFEST).exists() {
        return "flashmoe packed".into();
    }
    let Ok(text) = flashmoe_text::file::read_text(&dir.join("config.json")) else {
        return "unknown (no config.json)".into();
    };
    let Ok(cfg) = serde_json::from_str::<serde_json::Value>(&text) else {
        return "unknown (malformed config.json)".into();
    };
    let text_cfg = cfg.get("text_config");
    let field = |k: &str| cfg.get(k).or_else(|| text_cfg.and_then(|t| t.get(k)));
    if let Some(bits) = field("quantization").and_then(|q| q.get("bits")).and_then(serde_json::Value::as_u64) {
        return format!("MLX {bits}-bit");
    }
    match field("torch_dtype").or_else(|| field("dtype")).and_then(serde_json::Value::as_str) {
        Some("bfloat16") => "safetensors bf16".into(),
        Some("float16") => "safetensors f16".into(),
        Some("float32") => "safetensors f32".into(),
        Some(other) => format!("safetensors {other}"),
        None => "safetensors".into(),
    }
}

fn collect_refs(refs_dir: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    collect_files(refs_dir, refs_dir, &mut files, 0);
    files
        .into_iter()
        .filter_map(|r| flashmoe_text::file::read_text(&refs_dir.join(&r)).ok().map(|c| (r, c.trim().to_string())))
        .collect()
}

fn find_broken(root: &Path, dir: &Path, out: &mut Vec<String>, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            find_broken(root, &p, out, depth + 1);
        } else if !p.exists()
            && let Ok(rel) = p.strip_prefix(root)
        {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let hub = |repo: &str, rev: Option<&str>, q: Option<&str>| ModelRef::Hub {
            repo: repo.into(),
            revision: rev.map(Into::into),
            quant: q.map(Into::into),
        };
        assert_eq!(ModelRef::parse("builtin"), ModelRef::Builtin);
        assert_eq!(ModelRef::parse("Qwen/Qwen3.5-35B-A3B"), hub("Qwen/Qwen3.5-35B-A3B", None, None));
        assert_eq!(ModelRef::parse("unsloth/X-GGUF:Q4_K_M"), hub("unsloth/X-GGUF", None, Some("Q4_K_M")));
        assert_eq!(ModelRef::parse("a/b@v1.0:UD-Q2_K_XL"), hub("a/b", Some("v1.0"), Some("UD-Q2_K_XL")));
        for path in ["/no/such/dir", "./x/y", "a/b/c", "a--b/c", "-a/b", "a/b:", "a/b@"] {
            assert!(matches!(ModelRef::parse(path), ModelRef::Path(_)), "{path}");
        }
    }

    #[test]
    fn quant_labels_and_split_names() {
        assert_eq!(quant_label("Qwen3.5-35B-A3B-Q4_K_M.gguf").as_deref(), Some("Q4_K_M"));
        assert_eq!(quant_label("Qwen3.5-35B-A3B-UD-Q4_K_XL-00001-of-00003.gguf").as_deref(), Some("UD-Q4_K_XL"));
        assert_eq!(quant_label("model.IQ2_XXS.gguf").as_deref(), Some("IQ2_XXS"));
        assert_eq!(quant_label("Qwen3-Next-80B-A3B-BF16.gguf").as_deref(), Some("BF16"));
        assert_eq!(quant_label("model.gguf"), None);
        let g = GgufFile::parse("M-Q8_0-00002-of-00003.gguf");
        assert_eq!(g, GgufFile { stem: "M-Q8_0.gguf".into(), split: Some((2, 3)) });
        assert_eq!(split_name(&g.stem, 1, 3), "M-Q8_0-00001-of-00003.gguf");
        assert!(contains_part("Q4_K_M/M-Q4_K_M.gguf", "q4_k_m"));
        assert!(!contains_part("M-Q4_K_M.gguf", "Q4_K"));
    }
}
