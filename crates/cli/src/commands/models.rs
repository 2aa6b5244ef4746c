//! `flashmoe models`: the models on this machine — the built-in one, flashmoe's cache and every
//! model repo of the Hugging Face cache — with format, size and how each would run here (the
//! memory plan with this machine's RAM and GPU).

use crate::args::model::{BUILTIN_NAME, builtin_folder};
use crate::util::fmt_bytes;
use anyhow::Result;
use clap::Args;
use flashmoe::hub::{self, HubCache};
use flashmoe::memory::{self, Fit};
use serde_json::{Value as Json, json};
use std::path::Path;

#[derive(Args)]
pub struct ModelsArgs {
    /// Print JSON: {"machine": {...}, "hub_cache": DIR, "flashmoe_cache": DIR, "models": [...],
    /// "skipped": [...]}.
    #[arg(long)]
    json: bool,
}

/// One listed model.
struct Entry {
    name: String,
    source: &'static str,
    revision: Option<String>,
    path: String,
    format: String,
    size_on_disk: u64,
    /// (non-expert, expert) bytes when the engine can read the folder.
    footprint: Option<(u64, u64)>,
    fits: String,
}

impl Entry {
    fn json(&self) -> Json {
        json!({
            "name": self.name,
            "source": self.source,
            "revision": self.revision,
            "path": self.path,
            "format": self.format,
            "size_on_disk": self.size_on_disk,
            "non_expert_bytes": self.footprint.map(|f| f.0),
            "expert_bytes": self.footprint.map(|f| f.1),
            "total_bytes": self.footprint.map(|f| f.0 + f.1),
            "fits": self.fits,
        })
    }
}

/// This machine: total RAM, the first GPU's memory (when built with CUDA and one is there) and,
/// with several GPUs, how many and their memory together (a model split over them).
struct Machine {
    ram: Option<u64>,
    gpu: Option<(String, u64)>,
    all_gpus: Option<(usize, u64)>,
}

fn machine() -> Machine {
    #[cfg(feature = "cuda")]
    let gpus = flashmoe::cuda::probe().unwrap_or_default();
    #[cfg(feature = "cuda")]
    let gpu = gpus.first().map(|g| (format!("cuda:{} {}", g.ordinal, g.name), g.total_memory as u64));
    #[cfg(feature = "cuda")]
    let all_gpus = (gpus.len() > 1).then(|| (gpus.len(), gpus.iter().map(|g| g.total_memory as u64).sum()));
    #[cfg(not(feature = "cuda"))]
    let (gpu, all_gpus) = (None, None);
    Machine { ram: memory::total_ram_bytes(), gpu, all_gpus }
}

/// Footprint and fit of a loadable folder, or why not.
fn judge(dir: &Path, m: &Machine) -> (Option<(u64, u64)>, String) {
    let footprint = match memory::footprint(dir) {
        Ok(f) => Some((f.non_expert, f.experts)),
        Err(e) => return (None, format!("cannot tell: {e}")),
    };
    let Some(ram) = m.ram else { return (footprint, "cannot tell: RAM size unknown".into()) };
    let fits = match memory::fit(dir, ram, m.gpu.as_ref().map(|g| g.1)) {
        Ok(Fit::AllOnGpu) => format!("all in GPU memory ({})", m.gpu.as_ref().map_or("", |g| g.0.as_str())),
        // Too big for one GPU: would the GPUs together hold it (the layers split over them)?
        Ok(f) => match m.all_gpus.map(|(n, bytes)| (n, memory::fit(dir, ram, Some(bytes)))) {
            Some((n, Ok(Fit::AllOnGpu))) => format!("all in GPU memory over {n} GPUs (--device cuda:all)"),
            _ => f.describe(),
        },
        Err(e) => format!("cannot tell: {e}"),
    };
    (footprint, fits)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() { dir_size(&p) } else { std::fs::metadata(&p).map_or(0, |m| m.len()) }
        })
        .sum()
}

pub fn run(a: ModelsArgs) -> Result<()> {
    let m = machine();
    let mut entries = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();

    // The built-in model: embedded; unpacked on first use.
    let (builtin_dir, embedded) = builtin_folder();
    let unpacked = builtin_dir.join(flashmoe::packed::MANIFEST).exists();
    let (footprint, fits) =
        if unpacked { judge(&builtin_dir, &m) } else { (None, "cannot tell until unpacked (first use)".into()) };
    entries.push(Entry {
        name: hub::BUILTIN.into(),
        source: "builtin",
        revision: None,
        path: if unpacked { builtin_dir.display().to_string() } else { "(embedded; unpacked on first use)".into() },
        format: "flashmoe packed".into(),
        size_on_disk: if unpacked { dir_size(&builtin_dir) } else { embedded },
        footprint,
        fits,
    });

    // flashmoe's cache: packed models (older built-in copies among them).
    let fm_models = flashmoe::paths::cache_root().join("models");
    let mut fm_dirs: Vec<_> = std::fs::read_dir(&fm_models).into_iter().flatten().flatten().map(|e| e.path()).collect();
    fm_dirs.sort();
    for d in fm_dirs {
        let name = d.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if !d.is_dir() || name.starts_with('.') || d == builtin_dir {
            continue;
        }
        if !d.join(flashmoe::packed::MANIFEST).exists() {
            skipped.push((d.display().to_string(), "no manifest.json (an interrupted conversion?)".into()));
            continue;
        }
        let (footprint, fits) = judge(&d, &m);
        entries.push(Entry {
            name: d.display().to_string(),
            source: "flashmoe",
            revision: None,
            path: d.display().to_string(),
            format: "flashmoe packed".into(),
            size_on_disk: dir_size(&d),
            footprint,
            fits: if name.starts_with(&format!("{BUILTIN_NAME}-")) {
                format!("{fits}; an older build's built-in model (safe to delete)")
            } else {
                fits
            },
        });
    }

    // The Hugging Face cache.
    let hf = HubCache::from_env();
    let (repos, hf_skipped) = hub::scan(&hf);
    skipped.extend(hf_skipped.into_iter().map(|(p, why)| (p.display().to_string(), why)));
    for r in repos {
        if !r.partial_blobs.is_empty() {
            skipped.push((
                r.dir.join("blobs").display().to_string(),
                format!(
                    "{}: {} interrupted download(s) ({}); `flashmoe pull {}` resumes",
                    r.repo,
                    r.partial_blobs.len(),
                    r.partial_blobs.join(", "),
                    r.repo
                ),
            ));
        }
        for s in &r.snapshots {
            let revision = if s.refs.is_empty() { s.commit.clone() } else { s.refs.join(",") };
            let at = if s.refs.iter().any(|x| x == "main") { String::new() } else { format!("@{revision}") };
            if !s.broken_files.is_empty() {
                skipped.push((
                    s.path.display().to_string(),
                    format!("{}{at}: incomplete, missing {}", r.repo, s.broken_files.join(", ")),
                ));
                continue;
            }
            let ggufs = hub::gguf_groups_of(s.files.iter().cloned());
            if !s.path.join("config.json").exists() && !ggufs.is_empty() {
                for g in ggufs {
                    let size: u64 =
                        g.files.iter().map(|f| std::fs::metadata(s.path.join(f)).map_or(0, |m| m.len())).sum();
                    let quant = g.quant.clone().unwrap_or_else(|| g.stem.clone());
                    let (path, footprint, fits) = match g.first_part(&s.path) {
                        Ok(p) => {
                            let (footprint, fits) = judge(&p, &m);
                            (p.display().to_string(), footprint, fits)
                        }
                        Err(e) => {
                            skipped.push((s.path.join(&g.stem).display().to_string(), format!("{}: {e}", r.repo)));
                            continue;
                        }
                    };
                    entries.push(Entry {
                        name: format!("{}{at}:{quant}", r.repo),
                        source: "huggingface",
                        revision: Some(revision.clone()),
                        path,
                        format: format!("GGUF {quant}"),
                        size_on_disk: size,
                        footprint,
                        fits,
                    });
                }
                continue;
            }
            if !s.path.join("config.json").exists() {
                skipped
                    .push((s.path.display().to_string(), format!("{}{at}: no config.json and no .gguf file", r.repo)));
                continue;
            }
            let (footprint, fits) = judge(&s.path, &m);
            entries.push(Entry {
                name: format!("{}{at}", r.repo),
                source: "huggingface",
                revision: Some(revision),
                path: s.path.display().to_string(),
                format: hub::folder_format(&s.path),
                size_on_disk: s.size_on_disk,
                footprint,
                fits,
            });
        }
    }

    if a.json {
        let out = json!({
            "machine": {"ram_bytes": m.ram, "gpu": m.gpu.as_ref().map(|g| json!({"name": g.0, "bytes": g.1}))},
            "hub_cache": hf.path(),
            "flashmoe_cache": flashmoe::paths::cache_root(),
            "models": entries.iter().map(Entry::json).collect::<Vec<_>>(),
            "skipped": skipped.iter().map(|(p, why)| json!({"path": p, "reason": why})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "machine: RAM {}, GPU {}",
        m.ram.map_or("unknown".into(), fmt_bytes),
        m.gpu.as_ref().map_or("none".into(), |g| format!("{} ({})", g.0, fmt_bytes(g.1)))
    );
    println!("Hugging Face cache: {}", hf.describe());
    println!("flashmoe cache: {}", flashmoe::paths::cache_root().display());
    let w = entries.iter().map(|e| e.name.len()).max().unwrap_or(4).max(4);
    println!("{:w$}  {:18}  {:>10}  {:>21}  fits", "name", "format", "on disk", "experts + other");
    for e in &entries {
        let split = e.footprint.map_or("-".into(), |(ne, ex)| format!("{} + {}", fmt_bytes(ex), fmt_bytes(ne)));
        println!("{:w$}  {:18}  {:>10}  {:>21}  {}", e.name, e.format, fmt_bytes(e.size_on_disk), split, e.fits);
    }
    for (p, why) in &skipped {
        println!("skipped {p}: {why}");
    }
    Ok(())
}
