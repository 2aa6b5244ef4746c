//! The flashmoe packed model format, written by `flashmoe convert` and checked by `verify`:
//!
//! ```text
//! DIR/manifest.json          format, version, the model config, a table of every tensor
//! DIR/config.json            the model config (so every tool can read it as usual)
//! DIR/weights.bin            all non-expert tensors, each 4 KiB-aligned, memory-mappable
//! DIR/experts/layer_NNN.bin  that layer's routed experts; expert e is one contiguous blob at
//!                            e·stride (stride a multiple of 4 KiB), holding gate, up and down
//!                            (each weight, scales, biases), so fetching one expert is one read
//! DIR/tokenizer.json …       tokenizer and chat-template files copied from the source
//! ```
//!
//! Names inside are canonical (`model.layers.{i}.…`, Qwen3.5 projection layout, per-expert
//! `mlp.experts.{e}.…`), norms are stored as effective multipliers, and quantized matrices use the
//! MLX affine layout, so the same loader and kernels serve HF, MLX and packed models.
//!
//! A model converted from a GGUF keeps the GGUF's tensors instead ([`TensorLayout::Gguf`],
//! manifest version 2): llama.cpp's names and layouts, GGML block types, the bytes unchanged, so
//! that it loads through the same mapping as the GGUF file (`ggml`); only the routed experts are
//! regrouped, one blob per expert as above.

pub mod ggml;
pub mod quant;
pub mod verify;

pub use ggml::GgmlTable;

use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::weights::TensorStore;
use crate::weights::store::{Bytes, RawTensor};
use memmap2::Mmap;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT_NAME: &str = "flashmoe-packed";
/// The manifest version of a [`TensorLayout::Canonical`] model (what every build reads).
pub const FORMAT_VERSION: u32 = 1;
/// The manifest version that added [`TensorLayout::Gguf`]: the newest this build reads. A model
/// is written with the lowest version that describes it, so older builds still read what they can.
pub const GGUF_LAYOUT_VERSION: u32 = 2;
/// Alignment of tensors in weights.bin and of expert blobs: the page size and the O_DIRECT unit.
pub const ALIGN: usize = 4096;
pub const WEIGHTS_FILE: &str = "weights.bin";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuantInfo {
    pub bits: u32,
    pub group_size: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte offset in weights.bin (for experts: within the expert blob).
    pub offset: u64,
    pub nbytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantInfo>,
    /// xxh3-64 of the bytes, hex (non-expert tensors; experts are checked per blob).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<String>,
}

impl TensorEntry {
    /// The GGML type of an entry of a [`TensorLayout::Gguf`] manifest (the parser checked it).
    pub fn ggml_type(&self) -> Option<GgmlType> {
        GgmlType::from_name(&self.dtype)
    }

    /// For the GGUF layout: the dtype names a GGML type, the last dim is whole blocks of it, and
    /// the rows of those blocks are exactly `nbytes` (checked arithmetic).
    fn check_ggml(&self) -> std::result::Result<GgmlType, String> {
        let name = &self.name;
        let ty = self.ggml_type().ok_or_else(|| format!("tensor `{name}`: unknown GGML type `{}`", self.dtype))?;
        let Some((&cols, rows)) = self.shape.split_last() else {
            return Err(format!("tensor `{name}`: no dims"));
        };
        let row = ty.row_bytes(cols).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let want = rows.iter().try_fold(row as u64, |acc, &d| acc.checked_mul(d as u64));
        if want != Some(self.nbytes) {
            let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
            return Err(format!(
                "tensor `{name}`: shape {:?} of {} needs {want} bytes, manifest says {}",
                self.shape, self.dtype, self.nbytes
            ));
        }
        Ok(ty)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpertFile {
    pub layer: usize,
    pub file: String,
    pub num_experts: usize,
    /// Bytes from one expert's blob to the next (4 KiB multiple).
    pub stride: u64,
    /// Bytes of one blob that hold data (the rest of the stride is zero padding).
    pub blob_bytes: u64,
    /// Tensors inside one blob, with names relative to `mlp.experts.{e}.` (e.g. `gate_proj.weight`).
    pub components: Vec<TensorEntry>,
    /// xxh3-64 of each expert's whole stride, hex.
    pub xxh3: Vec<String>,
}

/// How a packed model's tensors are named, laid out and typed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorLayout {
    /// Canonical HF names, the Qwen3.5 projection layout, norms as effective multipliers,
    /// safetensors dtypes (float, or U32 codes with MLX affine scales and biases).
    #[default]
    Canonical,
    /// A GGUF's tensors as llama.cpp's converter wrote them (`gguf::Layout`): GGUF names
    /// (`blk.{i}.attn_qkv.weight`), dtypes that are GGML type names (`Q4_K`, `F32`…), shapes
    /// row-major (the GGUF dims reversed), bytes exactly the file's. Expert blobs hold
    /// `gate_proj.weight`, `up_proj.weight` and `down_proj.weight`, each an expert's rows of the
    /// stacked `ffn_*_exps` tensor. Needs manifest version [`GGUF_LAYOUT_VERSION`].
    Gguf,
}

impl TensorLayout {
    fn is_canonical(&self) -> bool {
        *self == TensorLayout::Canonical
    }

    /// The manifest version a model of this layout is written with.
    pub fn version(self) -> u32 {
        match self {
            TensorLayout::Canonical => FORMAT_VERSION,
            TensorLayout::Gguf => GGUF_LAYOUT_VERSION,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Absent in version 1 manifests, which are all canonical.
    #[serde(default, skip_serializing_if = "TensorLayout::is_canonical")]
    pub layout: TensorLayout,
    pub config: serde_json::Value,
    pub source: String,
    pub created_by: String,
    pub weights_file: String,
    pub tensors: Vec<TensorEntry>,
    pub experts: Vec<ExpertFile>,
    pub copied_files: Vec<String>,
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = flashmoe_text::file::read_text(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(&text, &path)
    }

    /// Parses a manifest and checks what every reader of it relies on: each size and offset
    /// (and their sums and products) fits in 64 bits and stays inside its blob, strides are
    /// 4 KiB multiples, there is one checksum per expert, every file it names lies inside
    /// the model folder, and in the GGUF layout every dtype is a GGML type whose whole blocks
    /// make up exactly the entry's bytes. `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let m: Manifest =
            serde_json::from_str(text).map_err(|e| Error::file(path, format!("malformed manifest: {e}")))?;
        if m.format != FORMAT_NAME {
            return Err(Error::file(path, format!("not a flashmoe packed model (format `{}`)", m.format)));
        }
        if !(FORMAT_VERSION..=GGUF_LAYOUT_VERSION).contains(&m.version) {
            return Err(Error::file(
                path,
                format!(
                    "packed format version {} is not supported (this build reads versions {FORMAT_VERSION} to {GGUF_LAYOUT_VERSION})",
                    m.version
                ),
            ));
        }
        if m.version < m.layout.version() {
            return Err(Error::file(
                path,
                format!(
                    "tensor layout `gguf` needs format version {GGUF_LAYOUT_VERSION}, the manifest says {}",
                    m.version
                ),
            ));
        }
        m.check_layout(path)?;
        Ok(m)
    }

    fn check_layout(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::file(path, msg));
        for name in
            std::iter::once(&self.weights_file).chain(self.experts.iter().map(|e| &e.file)).chain(&self.copied_files)
        {
            if !is_inside_folder(name) {
                return bad(format!("names the file `{name}`, which is not a relative path inside the model folder"));
            }
        }
        for t in &self.tensors {
            if t.offset.checked_add(t.nbytes).is_none() {
                return bad(format!("tensor `{}`: offset {} + {} bytes overflows", t.name, t.offset, t.nbytes));
            }
        }
        if self.layout == TensorLayout::Gguf {
            for (t, what) in
                self.tensors.iter().map(|t| (t, String::new())).chain(
                    self.experts.iter().flat_map(|ef| ef.components.iter().map(|c| (c, format!("{}: ", ef.file)))),
                )
            {
                if let Err(msg) = t.check_ggml() {
                    return bad(format!("{what}{msg}"));
                }
            }
        }
        for (i, ef) in self.experts.iter().enumerate() {
            let what = format!("expert file {} (entry {i})", ef.file);
            if ef.stride == 0 || !ef.stride.is_multiple_of(ALIGN as u64) {
                return bad(format!("{what}: stride {} is not a positive multiple of {ALIGN}", ef.stride));
            }
            if ef.stride.checked_mul(ef.num_experts as u64).is_none_or(|n| n > isize::MAX as u64) {
                return bad(format!("{what}: {} experts × stride {} is too large", ef.num_experts, ef.stride));
            }
            if ef.blob_bytes > ef.stride {
                return bad(format!("{what}: blob of {} bytes exceeds its stride {}", ef.blob_bytes, ef.stride));
            }
            if ef.xxh3.len() != ef.num_experts {
                return bad(format!("{what}: {} checksums for {} experts", ef.xxh3.len(), ef.num_experts));
            }
            for c in &ef.components {
                if c.offset.checked_add(c.nbytes).is_none_or(|end| end > ef.blob_bytes) {
                    return bad(format!(
                        "{what}: component `{}` (bytes {}+{}) lies outside the {}-byte blob",
                        c.name, c.offset, c.nbytes, ef.blob_bytes
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A file name a manifest may use: relative, without `..`, so `dir.join(name)` stays in `dir`.
fn is_inside_folder(name: &str) -> bool {
    use std::path::Component;
    !name.is_empty() && Path::new(name).components().all(|c| matches!(c, Component::Normal(_)))
}

pub fn parse_dtype(s: &str) -> Option<Dtype> {
    Some(match s {
        "F32" => Dtype::F32,
        "BF16" => Dtype::BF16,
        "F16" => Dtype::F16,
        "U32" => Dtype::U32,
        _ => return None,
    })
}

pub(crate) fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let f = flashmoe_text::file::open_regular(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping of a file we do not modify while mapped.
    let m = unsafe { Mmap::map(&f) }.map_err(|e| Error::file(path, format!("cannot map file: {e}")))?;
    crate::mapped::register(path, m.len() as u64);
    Ok(Arc::new(m))
}

fn raw(path: &Path, map: &Arc<Mmap>, name: String, e: &TensorEntry, base: u64) -> Result<RawTensor> {
    let dtype = parse_dtype(&e.dtype)
        .ok_or_else(|| Error::file(path, format!("tensor `{name}` has unsupported dtype `{}`", e.dtype)))?;
    let end = base.checked_add(e.offset).and_then(|s| s.checked_add(e.nbytes));
    let Some(end) = end.filter(|&end| end <= map.len() as u64) else {
        return Err(Error::file(
            path,
            format!(
                "tensor `{name}` ends at byte {} but the file has {} bytes (truncated?)",
                base as u128 + e.offset as u128 + e.nbytes as u128,
                map.len()
            ),
        ));
    };
    let start = end - e.nbytes;
    let want =
        e.shape.iter().try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d as u64)).map(|bits| bits / 8);
    if want != Some(e.nbytes) {
        let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
        return Err(Error::file(
            path,
            format!("tensor `{name}`: shape {:?} needs {want} bytes, manifest says {}", e.shape, e.nbytes),
        ));
    }
    Ok(RawTensor {
        name,
        dtype,
        shape: e.shape.clone(),
        bytes: Bytes::new(map.clone(), start as usize, e.nbytes as usize),
        file: path.to_path_buf(),
    })
}

/// Opens a packed model as a tensor store (everything memory-mapped).
/// Any model folder's tensors: a packed model's, or the safetensors files of an HF/MLX folder.
pub fn open_any(dir: &Path) -> Result<TensorStore> {
    if dir.join(MANIFEST).exists() { open_store(dir) } else { TensorStore::open_safetensors(dir) }
}

pub fn open_store(dir: &Path) -> Result<TensorStore> {
    open_with(dir, &Manifest::load(dir)?, true)
}

/// The non-expert tensors only (the experts are served by the expert store).
pub fn open_store_without_experts(dir: &Path, m: &Manifest) -> Result<TensorStore> {
    open_with(dir, m, false)
}

fn open_with(dir: &Path, m: &Manifest, map_experts: bool) -> Result<TensorStore> {
    if m.layout == TensorLayout::Gguf {
        // Its tensors are GGUF-named GGML blocks: only the GGUF mapping reads them (`GgmlTable`).
        return Err(Error::file(
            dir.join(MANIFEST),
            "holds a GGUF's tensors as they are (converted from a GGUF): it runs as it is, but cannot be a source of `convert`; convert the GGUF file itself",
        ));
    }
    let wpath = dir.join(&m.weights_file);
    let wmap = map_file(&wpath)?;
    let mut tensors = Vec::with_capacity(m.tensors.len());
    for e in &m.tensors {
        tensors.push(raw(&wpath, &wmap, e.name.clone(), e, 0)?);
    }
    let mut files = vec![wpath];
    for ef in m.experts.iter().filter(|_| map_experts) {
        let path = dir.join(&ef.file);
        let map = map_file(&path)?;
        let want = ef.stride * ef.num_experts as u64;
        if map.len() as u64 != want {
            return Err(Error::file(
                &path,
                format!(
                    "has {} bytes, expected {} experts × {} = {want} (truncated or mismatched file)",
                    map.len(),
                    ef.num_experts,
                    ef.stride
                ),
            ));
        }
        for x in 0..ef.num_experts {
            for c in &ef.components {
                let name = format!("model.layers.{}.mlp.experts.{x}.{}", ef.layer, c.name);
                tensors.push(raw(&path, &map, name, c, x as u64 * ef.stride)?);
            }
        }
        files.push(path);
    }
    Ok(TensorStore::from_parts(dir, files, tensors))
}

/// Checks each non-expert tensor of an opened packed model against its manifest checksum: the
/// resident weights are read once at load, so a damaged weights.bin is an error naming the
/// tensor instead of fluent wrong text (experts are checked on their first read). On the
/// compute pool; xxh3 runs faster than the disk read it follows. `--no-verify` skips it.
pub fn check_resident(store: &TensorStore, m: &Manifest) -> Result<()> {
    check_sums(m, &store.dir.join(&m.weights_file), &|e| store.get(&e.name).map(|t| t.bytes.as_slice()))
}

/// [`check_resident`] over any view of weights.bin (`wpath`): `bytes_of` gives an entry's bytes.
fn check_sums<'a>(
    m: &Manifest,
    wpath: &Path,
    bytes_of: &(dyn Fn(&TensorEntry) -> Option<&'a [u8]> + Sync),
) -> Result<()> {
    use rayon::prelude::*;
    m.tensors.par_iter().try_for_each(|e| {
        let Some(want) = &e.xxh3 else { return Ok(()) };
        let bytes = bytes_of(e).ok_or_else(|| Error::file(wpath, format!("tensor `{}` missing", e.name)))?;
        if xxh3_hex(bytes) != *want {
            return Err(Error::file(
                wpath,
                format!(
                    "tensor `{}` (bytes {}..{}) fails its checksum: the file is damaged (`flashmoe verify` checks the whole model; --no-verify skips this check)",
                    e.name,
                    e.offset,
                    e.offset + e.nbytes
                ),
            ));
        }
        Ok(())
    })
}

pub fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

pub fn expert_file_name(layer: usize) -> String {
    format!("experts/layer_{layer:03}.bin")
}

pub fn align_up(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}

/// Source files copied next to the packed weights when present.
pub const COPIED_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "special_tokens_map.json",
];
