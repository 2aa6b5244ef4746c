//! `flashmoe pull`: downloads a model repo from the Hugging Face Hub into the Hugging Face cache
//! (the `hf-hub` crate: `refs/`, `snapshots/`, `blobs/`, as `huggingface_hub` lays them out), so
//! that `--model OWNER/NAME` finds it. HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE and HF_HOME are
//! honoured. Each file is written as `blobs/<etag>.part` and renamed when complete; a rerun
//! resumes a `.part` left by an interrupted one (HTTP range request) and skips files already there.

use crate::util::fmt_bytes;
use anyhow::{Result, anyhow, bail};
use clap::Args;
use flashmoe::hub::{self, HubCache, ModelRef};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};
use indicatif::ProgressBar;
use std::io::IsTerminal;

#[derive(Args)]
pub struct PullArgs {
    /// Hub repo: OWNER/NAME[@REVISION], or OWNER/NAME:QUANT for one GGUF quantization.
    repo: String,
    /// Branch, tag or commit (default: main, or the @REVISION of the name).
    #[arg(long)]
    revision: Option<String>,
    /// Download only the files matching this glob (repeatable), e.g. --include "*.json"
    /// --include "*Q4_K_M*". `*` also matches `/`, as in huggingface_hub's allow_patterns.
    #[arg(long)]
    include: Vec<String>,
}

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

pub fn run(a: PullArgs) -> Result<()> {
    let Some(ModelRef::Hub { repo, revision, quant }) = ModelRef::parse_hub(&a.repo) else {
        bail!("`{}` is not a Hub repo name (OWNER/NAME[@REVISION][:QUANT])", a.repo);
    };
    let revision = match (a.revision, revision) {
        (Some(r), Some(n)) if r != n => bail!("--revision {r} contradicts {}@{n}", repo),
        (r, n) => r.or(n).unwrap_or_else(|| "main".into()),
    };
    let patterns = globs(&a.include)?;
    let hub = HubCache::from_env();
    let endpoint = std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
        .trim_end_matches('/')
        .to_string();
    let mut builder = ApiBuilder::from_cache(hub.cache.clone()).with_endpoint(endpoint.clone()).with_progress(false);
    if let Some(t) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(t));
    }
    let api = builder.build().map_err(|e| anyhow!("starting the HTTP client: {e}"))?;
    let remote = api.repo(Repo::with_revision(repo.clone(), RepoType::Model, revision.clone()));
    let explain = |e: ApiError| explain(e, &repo, &revision, &endpoint);
    let info = remote.info().map_err(explain)?;
    let all: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let mut files: Vec<String> = match &quant {
        Some(q) => {
            let groups = hub::gguf_groups_of(all.iter().cloned());
            let g = hub::pick_quant(&groups, q).map_err(|m| anyhow!("{repo}:{q} on {endpoint}: {m}"))?;
            g.files.clone()
        }
        None => all.clone(),
    };
    if let Some(p) = &patterns {
        files.retain(|f| p.is_match(f));
    }
    if files.is_empty() {
        bail!("{repo}@{revision}: none of its {} files matches --include {}", all.len(), a.include.join(" --include "));
    }
    let cache_repo = hub.cache.repo(Repo::with_revision(repo.clone(), RepoType::Model, revision.clone()));
    let snapshot = cache_repo.pointer_path(&info.sha);
    let show_bars = std::io::stderr().is_terminal();
    // What is missing, and whether it fits on the disk before anything is written.
    let mut todo = Vec::new();
    for f in &files {
        if !snapshot.join(f).is_file() {
            let meta = api.metadata(&remote.url(f)).map_err(explain)?;
            todo.push((f, meta.size() as u64));
        }
    }
    let present = files.len() - todo.len();
    let need: u64 = todo.iter().map(|t| t.1).sum();
    if let Some(free) = flashmoe::paths::free_space(hub.path())
        && need > free
    {
        bail!(
            "{repo}@{revision}: {} to download but {} free at {}",
            fmt_bytes(need),
            fmt_bytes(free),
            hub.path().display()
        );
    }
    let (mut fetched, mut bytes) = (0usize, 0u64);
    for (f, size) in todo {
        if !show_bars {
            eprintln!("[flashmoe] downloading {f} ({})", fmt_bytes(size));
        }
        let path = if show_bars {
            remote.download_with_progress(f, ProgressBar::new(0))
        } else {
            remote.download_with_progress(f, ())
        }
        .map_err(explain)?;
        // The crate renames the finished `.part` without checking its length: a short body must
        // not pass for the file.
        let got = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if got != size {
            let blob = path.canonicalize().ok();
            let _ = std::fs::remove_file(&path);
            if let Some(b) = blob {
                let _ = std::fs::remove_file(b);
            }
            bail!("{f}: received {got} bytes of {size} (connection cut?); run `flashmoe pull` again");
        }
        fetched += 1;
        bytes += got;
    }
    // A snapshot that is all there but older than the branch: point the ref at it anyway (the
    // crate writes the ref only when it downloads).
    if fetched == 0 {
        cache_repo.create_ref(&info.sha).map_err(|e| anyhow!("{}: cannot write the ref: {e}", snapshot.display()))?;
    }
    eprintln!(
        "[flashmoe] {repo}@{revision} (commit {}): {fetched} file(s) downloaded ({}), {present} already there → {}",
        info.sha,
        fmt_bytes(bytes),
        snapshot.display()
    );
    let name = match &quant {
        Some(q) => format!("{repo}:{q}"),
        None => repo.clone(),
    };
    let name = if revision == "main" { name } else { name.replacen(&repo, &format!("{repo}@{revision}"), 1) };
    eprintln!("[flashmoe] run it with: flashmoe run --model {name}");
    Ok(())
}

/// One matcher for all the --include patterns (None: no filter).
fn globs(patterns: &[String]) -> Result<Option<globset::GlobSet>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns {
        b.add(globset::Glob::new(p).map_err(|e| anyhow!("--include {p}: {e}"))?);
    }
    Ok(Some(b.build().map_err(|e| anyhow!("--include: {e}"))?))
}

/// The crate's errors in words, with what to do about the common ones.
fn explain(e: ApiError, repo: &str, revision: &str, endpoint: &str) -> anyhow::Error {
    if let ApiError::RequestError(inner) = &e
        && let ureq::Error::StatusCode(code) = **inner
    {
        return match code {
            401 | 403 => anyhow!(
                "{repo}@{revision} on {endpoint}: access denied (HTTP {code}); a gated or private repo needs a token: set HF_TOKEN"
            ),
            404 => anyhow!("{repo}@{revision}: not found on {endpoint} (HTTP 404); check the name and the revision"),
            _ => anyhow!("{repo}@{revision} on {endpoint}: HTTP {code}"),
        };
    }
    if let ApiError::LockAcquisition(p) = &e {
        return anyhow!(
            "{}: another download of this file is running (flashmoe pull or huggingface_hub); wait for it",
            p.display()
        );
    }
    anyhow!("{repo}@{revision} from {endpoint}: {e}")
}
