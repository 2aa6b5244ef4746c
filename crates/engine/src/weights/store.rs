//! Memory-mapped safetensors folders: a single `*.safetensors` file, several, or shards listed by
//! `model.safetensors.index.json`. Headers are parsed and validated with the `safetensors` crate;
//! tensor bytes stay in the mapping and are only touched when a kernel reads them.

use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Something that owns weight bytes: a file mapping, or an aligned buffer an expert was read into.
pub trait ByteSource: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl ByteSource for Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl ByteSource for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A byte range of a mapping or buffer. Cheap to clone; keeps its owner alive.
#[derive(Clone)]
pub struct Bytes {
    map: Arc<dyn ByteSource>,
    start: usize,
    len: usize,
}

impl Bytes {
    pub fn new(map: Arc<dyn ByteSource>, start: usize, len: usize) -> Self {
        assert!(start + len <= map.bytes().len());
        Bytes { map, start, len }
    }
    /// A sub-range of this range.
    pub fn slice(&self, offset: usize, len: usize) -> Bytes {
        assert!(offset + len <= self.len);
        Bytes { map: self.map.clone(), start: self.start + offset, len }
    }
    /// Offset of this range within its owner (for a file mapping: the file offset).
    pub fn start(&self) -> usize {
        self.start
    }
    /// Address of the owner's first byte: identifies which mapping this range belongs to.
    pub fn owner_addr(&self) -> *const u8 {
        self.map.bytes().as_ptr()
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.map.bytes()[self.start..self.start + self.len]
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// This range's position without its owner, for a layout that is applied to many buffers
    /// (see [`Bytes::rebased`]). It holds no bytes: reading it panics, so it stays inside the
    /// template that made it.
    pub(crate) fn detached(&self) -> Bytes {
        Bytes { map: Arc::new(NoBytes), start: self.start, len: self.len }
    }
    /// The same range of another owner; None when the range does not lie inside it.
    pub(crate) fn rebased(&self, map: &Arc<dyn ByteSource>) -> Option<Bytes> {
        let end = self.start.checked_add(self.len)?;
        (end <= map.bytes().len()).then(|| Bytes { map: map.clone(), start: self.start, len: self.len })
    }
}

/// The owner of detached ranges: none of their bytes.
struct NoBytes;

impl ByteSource for NoBytes {
    fn bytes(&self) -> &[u8] {
        &[]
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({}..{})", self.start, self.start + self.len)
    }
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Bytes,
    pub file: PathBuf,
}

impl RawTensor {
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::Tensor { name: self.name.clone(), file: self.file.clone(), msg: msg.into() }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts a (small) float tensor to f32. Used for norms, gates, conv kernels: vectors that are
    /// tiny next to the matrices, so owning an f32 copy costs nothing and keeps the hot loops simple.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let b = self.bytes.as_slice();
        let n = self.numel();
        let v: Vec<f32> = match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(self.err(format!("unsupported dtype {other:?} (expected F32, BF16 or F16)")));
            }
        };
        if v.len() != n {
            return Err(self.err(format!("holds {} values but its shape {:?} needs {n}", v.len(), self.shape)));
        }
        Ok(v)
    }
}

/// All tensors of a model folder, by name.
pub struct TensorStore {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    tensors: HashMap<String, RawTensor>,
    packed: bool,
    /// The mapping of each file in `files` (same order).
    maps: Vec<Arc<Mmap>>,
}

impl TensorStore {
    /// The safetensors files of `dir` (one file, or shards named by model.safetensors.index.json).
    /// A packed model folder is opened by `packed::open_any`.
    pub fn open_safetensors(dir: &Path) -> Result<Self> {
        if !dir.exists() {
            return Err(Error::NotFound(dir.to_path_buf()));
        }
        let files = Self::list_files(dir)?;
        let mut tensors = HashMap::new();
        let mut maps = Vec::new();
        for path in &files {
            let file = flashmoe_text::file::open_regular(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the mapping is read-only. Like every mmap-based loader we rely on the file not
            // being truncated while the model is in use.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, format!("cannot map file: {e}")))?;
            crate::mapped::register(path, map.len() as u64);
            let map = Arc::new(map);
            maps.push(map.clone());
            for t in Self::safetensors_tensors(map, path)? {
                let name = t.name.clone();
                if let Some(prev) = tensors.insert(name.clone(), t) {
                    return Err(Error::file(path, format!("tensor `{name}` is also in {}", prev.file.display())));
                }
            }
        }
        Ok(TensorStore { dir: dir.to_path_buf(), files, tensors, packed: false, maps })
    }

    /// The tensors of one safetensors file held in `map`. The safetensors crate checks the
    /// header (length, JSON, each tensor's offsets against its shape and the data size); the
    /// ranges are checked again here before any view is made. `path` only names the file.
    pub fn safetensors_tensors(map: Arc<dyn ByteSource>, path: &Path) -> Result<Vec<RawTensor>> {
        let bytes = map.bytes();
        let (header_len, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::file(path, format!("invalid safetensors file: {}", describe(&e, bytes.len()))))?;
        let data_start = 8usize.checked_add(header_len);
        let mut out = Vec::new();
        for (name, info) in meta.tensors() {
            let (a, b) = info.data_offsets;
            let start = data_start.and_then(|d| d.checked_add(a));
            let Some((start, len)) =
                start.zip(b.checked_sub(a)).filter(|&(s, n)| s.checked_add(n).is_some_and(|e| e <= bytes.len()))
            else {
                return Err(Error::file(path, format!("tensor `{name}`: data offsets {a}..{b} lie outside the file")));
            };
            out.push(RawTensor {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                bytes: Bytes::new(map.clone(), start, len),
                file: path.to_path_buf(),
            });
        }
        Ok(out)
    }

    /// The shard files a `model.safetensors.index.json` (text `index_text`, at `index`) names,
    /// each once, in `dir`. Names must stay inside `dir` (no absolute paths, no `..`).
    pub fn index_files(index_text: &str, dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
        let v: serde_json::Value =
            serde_json::from_str(index_text).map_err(|e| Error::file(index, format!("malformed JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(index, "missing object `weight_map`"))?;
        let mut names = BTreeSet::new();
        for (tensor, file) in map {
            let f = file
                .as_str()
                .ok_or_else(|| Error::file(index, format!("weight_map entry `{tensor}` is not a file name")))?;
            let inside =
                !f.is_empty() && Path::new(f).components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside {
                return Err(Error::file(
                    index,
                    format!("weight_map entry `{tensor}` names `{f}`, which is not a file inside the model folder"),
                ));
            }
            names.insert(f.to_string());
        }
        Ok(names.into_iter().map(|n| dir.join(n)).collect())
    }

    /// A store over tensors located by a packed-model manifest.
    pub(crate) fn from_parts(dir: &Path, files: Vec<PathBuf>, tensors: Vec<RawTensor>) -> Self {
        TensorStore {
            dir: dir.to_path_buf(),
            files,
            tensors: tensors.into_iter().map(|t| (t.name.clone(), t)).collect(),
            packed: true,
            maps: Vec::new(),
        }
    }

    /// Index in `files` of the file a byte range was mapped from.
    pub fn file_index_of(&self, b: &Bytes) -> Option<usize> {
        self.maps.iter().position(|m| m.as_ptr() == b.owner_addr())
    }

    /// True for a flashmoe packed model (norm weights already effective, canonical names).
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = flashmoe_text::file::read_text(&index).map_err(|e| Error::io(&index, e))?;
            let files = Self::index_files(&text, dir, &index)?;
            for f in &files {
                if !f.exists() {
                    return Err(Error::file(f, "file not found (listed in model.safetensors.index.json)"));
                }
            }
            return Ok(files);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::file(dir, "no *.safetensors files in this folder"));
        }
        Ok(files)
    }

    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Where a tensor would be expected, for "missing tensor" messages.
    pub fn describe_location(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            _ => format!("{} ({} files)", self.dir.display(), self.files.len()),
        }
    }
}

fn describe(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file too short for a header ({file_len} bytes)"),
        E::InvalidHeaderLength => "header length points past the end of the file (truncated?)".into(),
        E::MetadataIncompleteBuffer => "tensor data does not match the file size (truncated or padded file)".into(),
        E::InvalidHeaderDeserialization(j) => format!("corrupt header JSON: {j}"),
        other => format!("{other}"),
    }
}
