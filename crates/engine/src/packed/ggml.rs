//! The weights.bin of a packed model converted from a GGUF ([`TensorLayout::Gguf`]) seen as the
//! GGUF it came from: a [`TensorListing`] of GGUF-named tensors in one part (weights.bin), so
//! that `gguf::tensors::map_tensors` maps it with the same names, dims checks and layout facts
//! as the file, and the same tree builder (`models::qwen35::gguf`) loads both.

use super::{Manifest, TensorLayout, check_sums, map_file};
use crate::error::{Error, Result};
use crate::gguf::{Location, TensorInfo, TensorListing};
use crate::weights::store::{ByteSource, Bytes};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The non-expert tensors of a GGUF-layout packed model, weights.bin mapped.
pub struct GgmlTable {
    path: PathBuf,
    map: Arc<Mmap>,
    /// Each manifest tensor as the GGUF header described it: GGUF dims (ne0 first), the range in
    /// weights.bin as `start`/`len`.
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl GgmlTable {
    /// Maps `dir`'s weights.bin and lists the tensors of `m` (a GGUF-layout manifest), each
    /// checked to lie inside the file.
    pub fn open(dir: &Path, m: &Manifest) -> Result<Self> {
        let path = dir.join(&m.weights_file);
        if m.layout != TensorLayout::Gguf {
            return Err(Error::file(dir.join(super::MANIFEST), "not a packed model converted from a GGUF"));
        }
        let map = map_file(&path)?;
        let mut tensors = Vec::with_capacity(m.tensors.len());
        let mut index = HashMap::with_capacity(m.tensors.len());
        for e in &m.tensors {
            // The parser checked the type and that offset + nbytes does not overflow.
            let ggml_type = e
                .ggml_type()
                .ok_or_else(|| Error::file(&path, format!("tensor `{}`: unknown GGML type `{}`", e.name, e.dtype)))?;
            if e.offset + e.nbytes > map.len() as u64 {
                return Err(Error::file(
                    &path,
                    format!(
                        "tensor `{}` ends at byte {} but the file has {} bytes (truncated?)",
                        e.name,
                        e.offset + e.nbytes,
                        map.len()
                    ),
                ));
            }
            if index.insert(e.name.clone(), tensors.len()).is_some() {
                return Err(Error::file(dir.join(super::MANIFEST), format!("tensor `{}` is listed twice", e.name)));
            }
            tensors.push(TensorInfo {
                name: e.name.clone(),
                dims: e.shape.iter().rev().map(|&d| d as u64).collect(),
                ggml_type,
                offset: e.offset,
                start: e.offset,
                len: e.nbytes,
            });
        }
        Ok(GgmlTable { path, map, tensors, index })
    }

    /// Checks every tensor against its manifest checksum (what [`super::check_resident`] does
    /// for a canonical model).
    pub fn check_resident(&self, m: &Manifest) -> Result<()> {
        check_sums(m, &self.path, &|e| {
            let t = &self.tensors[*self.index.get(&e.name)?];
            Some(&self.map[t.start as usize..(t.start + t.len) as usize])
        })
    }
}

impl TensorListing for GgmlTable {
    fn path(&self) -> &Path {
        &self.path
    }
    fn part_path(&self, _part: usize) -> &Path {
        &self.path
    }
    fn tensors(&self) -> Box<dyn Iterator<Item = (usize, &TensorInfo)> + '_> {
        Box::new(self.tensors.iter().map(|t| (0, t)))
    }
    fn tensor(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        self.index.get(name).map(|&i| (0, &self.tensors[i]))
    }
    fn bytes(&self, loc: Location) -> Bytes {
        let map: Arc<dyn ByteSource> = self.map.clone();
        Bytes::new(map, loc.start as usize, loc.len as usize)
    }
    fn has_stacked_experts(&self) -> bool {
        false
    }
}
