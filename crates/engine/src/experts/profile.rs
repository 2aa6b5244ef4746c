//! Routing profiles: how often each routed expert of each layer was chosen. The expert store
//! counts every routed use; a run saves the counts beside the model in the cache folder, and the
//! next run pre-warms its tiers hottest-first from them (`--routing-profile`).
//!
//! File format: the per-layer JSON object of `testdata/routing/*.json` (keys "0", "1", …; each
//! with `gini` and `top20pct_coverage`), extended with `counts`: one activation count per expert.
//! The measured profiles in `testdata/routing` carry only the summary statistics, not which
//! experts are hot, so they cannot seed a pre-warm; loading one says so.

use crate::error::{Error, Result};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct RoutingProfile {
    /// `counts[layer][expert]`: times the router chose that expert.
    pub counts: Vec<Vec<u64>>,
}

impl RoutingProfile {
    pub fn empty(num_layers: usize, num_experts: usize) -> Self {
        RoutingProfile { counts: vec![vec![0; num_experts]; num_layers] }
    }

    /// Routed uses counted, summed over layers.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Adds another profile's counts (same geometry).
    pub fn merge(&mut self, other: &RoutingProfile) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }

    /// Every (layer, expert) with a non-zero count, most used first (ties: lower layer, then
    /// lower expert, so the order is deterministic).
    pub fn hottest(&self) -> Vec<(u32, u32)> {
        let mut keys: Vec<(u32, u32)> = self
            .counts
            .iter()
            .enumerate()
            .flat_map(|(l, c)| c.iter().enumerate().filter(|(_, n)| **n > 0).map(move |(e, _)| (l as u32, e as u32)))
            .collect();
        keys.sort_by(|a, b| {
            let (ca, cb) = (self.counts[a.0 as usize][a.1 as usize], self.counts[b.0 as usize][b.1 as usize]);
            cb.cmp(&ca).then(a.cmp(b))
        });
        keys
    }

    /// Every (layer, expert): the used ones as in `hottest`, then the never-used ones in
    /// (layer, expert) order (a pre-warm fills the room the profile cannot rank with them).
    pub fn ranking(&self) -> Vec<(u32, u32)> {
        let mut keys = self.hottest();
        for (l, c) in self.counts.iter().enumerate() {
            keys.extend(c.iter().enumerate().filter(|(_, n)| **n == 0).map(|(e, _)| (l as u32, e as u32)));
        }
        keys
    }

    /// `ranking` with each expert's uses per token (`k` experts per token: the profile covers
    /// about Σ counts of a layer ÷ k tokens).
    pub fn ranking_with_rates(&self, k: usize) -> Vec<((u32, u32), f64)> {
        let tokens = self.counts.iter().map(|c| c.iter().sum::<u64>()).max().unwrap_or(0) as f64 / k.max(1) as f64;
        self.ranking()
            .into_iter()
            .map(|(l, e)| ((l, e), self.counts[l as usize][e as usize] as f64 / tokens.max(1.0)))
            .collect()
    }

    /// Reads a profile and checks it against the model's geometry.
    pub fn load(path: &Path, num_layers: usize, num_experts: usize) -> Result<Self> {
        let text = flashmoe_text::file::read_text(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("malformed JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| Error::file(path, "expected an object keyed by layer index"))?;
        let mut counts = vec![Vec::new(); num_layers];
        for (k, val) in obj {
            let l: usize = k.parse().map_err(|_| Error::file(path, format!("key `{k}` is not a layer index")))?;
            if l >= num_layers {
                return Err(Error::file(path, format!("has layer {l}; the model has {num_layers} layers")));
            }
            let c = val.get("counts").and_then(Value::as_array).ok_or_else(|| {
                Error::file(
                    path,
                    format!(
                        "layer {l} has no per-expert `counts` (a summary-only profile cannot say which \
                         experts are hot; use one written by flashmoe)"
                    ),
                )
            })?;
            if c.len() != num_experts {
                return Err(Error::file(
                    path,
                    format!("layer {l} counts {} experts; the model has {num_experts}", c.len()),
                ));
            }
            counts[l] = c
                .iter()
                .map(|x| x.as_u64().ok_or_else(|| Error::file(path, format!("layer {l}: counts must be integers ≥ 0"))))
                .collect::<Result<_>>()?;
        }
        if let Some(l) = counts.iter().position(Vec::is_empty) {
            return Err(Error::file(path, format!("has no entry for layer {l}")));
        }
        Ok(RoutingProfile { counts })
    }

    /// Writes the profile atomically (a temporary file renamed over the target).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut obj = Map::new();
        for (l, c) in self.counts.iter().enumerate() {
            obj.insert(
                l.to_string(),
                json!({ "gini": gini(c), "top20pct_coverage": top_coverage(c, 0.2), "counts": c }),
            );
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let text = serde_json::to_string(&Value::Object(obj)).map_err(|e| Error::input(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    /// Where runs of the model in `model_dir` keep its profile: the cache folder, under a name
    /// made of the folder's name and a hash of its canonical path.
    pub fn default_path(model_dir: &Path) -> PathBuf {
        let canon = model_dir.canonicalize().unwrap_or_else(|_| model_dir.to_path_buf());
        let hash = xxhash_rust::xxh3::xxh3_64(canon.as_os_str().as_encoded_bytes());
        let name: String = canon
            .file_name()
            .map(|n| n.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect())
            .unwrap_or_default();
        crate::paths::cache_root().join("routing-profiles").join(format!("{name}-{hash:016x}.json"))
    }
}

/// Gini coefficient of non-negative counts: 0 when all are equal, (n−1)/n when one holds all.
pub fn gini(counts: &[u64]) -> f64 {
    let n = counts.len();
    let total: u64 = counts.iter().sum();
    if n == 0 || total == 0 {
        return 0.0;
    }
    let mut c = counts.to_vec();
    c.sort_unstable();
    let weighted: f64 = c.iter().enumerate().map(|(i, &x)| (i as f64 + 1.0) * x as f64).sum();
    2.0 * weighted / (n as f64 * total as f64) - (n as f64 + 1.0) / n as f64
}

/// Share of all activations that go to the most used `frac` of experts (at least one expert).
pub fn top_coverage(counts: &[u64], frac: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mut c = counts.to_vec();
    c.sort_unstable_by(|a, b| b.cmp(a));
    let m = ((counts.len() as f64 * frac).floor() as usize).max(1);
    c[..m].iter().sum::<u64>() as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let p = RoutingProfile { counts: vec![vec![0, 5, 1], vec![5, 0, 9]] };
        assert_eq!(p.hottest(), vec![(1, 2), (0, 1), (1, 0), (0, 2)]);
        assert_eq!(p.ranking(), vec![(1, 2), (0, 1), (1, 0), (0, 2), (0, 0), (1, 1)]);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        p.save(&f).unwrap();
        assert_eq!(RoutingProfile::load(&f, 2, 3).unwrap(), p);
        let err = RoutingProfile::load(&f, 2, 4).unwrap_err().to_string();
        assert!(err.contains("counts 3 experts; the model has 4"), "{err}");
        assert!(RoutingProfile::load(&f, 1, 3).unwrap_err().to_string().contains("has layer 1"));
    }

    #[test]
    fn summary_only_profiles_are_refused_clearly() {
        let f = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/routing/qwen3.5-35b-expert-activation-profile.json");
        let err = RoutingProfile::load(&f, 40, 256).unwrap_err().to_string();
        assert!(err.contains("no per-expert `counts`"), "{err}");
    }
}
