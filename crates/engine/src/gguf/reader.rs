//! The GGUF container: header, metadata key/values, tensor infos, data section (versions 2 and 3,
//! little-endian). Layout (ggml `docs/gguf.md`): magic "GGUF", u32 version, u64 tensor count,
//! u64 key/value count, the key/values, the tensor infos (name, u32 n_dims, u64 dims ne0 first,
//! u32 type, u64 offset relative to the data section), padding to `general.alignment`
//! (default 32), then the tensor data.
//!
//! The parser works on a byte slice so the same code serves mapped files and the fuzzer. Every
//! count and length is checked against the bytes left before anything is allocated, so a hostile
//! header cannot ask for more memory than a small multiple of the file's size.

use super::types::GgmlType;
use crate::error::{Error, Result};
use crate::weights::store::{ByteSource, Bytes};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays of arrays deeper than this are refused: nothing real nests at all, and unbounded
/// nesting would let a file overflow the parser's stack.
const MAX_ARRAY_DEPTH: u32 = 8;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Vectors sized by a count from the file start at most this big and grow as items are actually
/// read: a count that passes the bytes-left check can still be far larger than what a hostile
/// file really holds, and each item costs more in memory than its smallest encoding on disk.
const MAX_PREALLOC: usize = 1 << 16;

/// Reads `n` items with `read`, allocating only for items actually read.
fn read_n<T>(n: usize, mut read: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
    let mut v = Vec::with_capacity(n.min(MAX_PREALLOC));
    for _ in 0..n {
        v.push(read()?);
    }
    Ok(v)
}

/// One metadata value. Arrays are typed so a long array costs its own size, not one enum per item.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// GGUF value type ids (gguf-py `GGUFValueType`).
fn type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => return None,
    })
}

/// The fewest bytes a value of type `id` takes in the file (a string or array may be empty).
fn min_size(id: u32) -> u64 {
    match id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// An integer of any width as i128 (every GGUF integer fits).
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A float or an integer as f64 (converters write some floats as ints and vice versa).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short rendering for messages and `info`: arrays by type and length.
    pub fn brief(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 60 => {
                format!("{:?}… ({} bytes)", s.chars().take(60).collect::<String>(), s.len())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{}; {}]", a.item_type(), a.len()),
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            v => v.as_int().map(|i| i.to_string()).unwrap_or_default(),
        }
    }
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn item_type(&self) -> &'static str {
        match self {
            Array::U8(_) => "u8",
            Array::I8(_) => "i8",
            Array::U16(_) => "u16",
            Array::I16(_) => "i16",
            Array::U32(_) => "u32",
            Array::I32(_) => "i32",
            Array::F32(_) => "f32",
            Array::Bool(_) => "bool",
            Array::String(_) => "string",
            Array::Array(_) => "array",
            Array::U64(_) => "u64",
            Array::I64(_) => "i64",
            Array::F64(_) => "f64",
        }
    }

    /// Integer items as i128 (None for non-integer arrays).
    pub fn ints(&self) -> Option<Vec<i128>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x.into()).collect(),
            Array::I8(v) => v.iter().map(|&x| x.into()).collect(),
            Array::U16(v) => v.iter().map(|&x| x.into()).collect(),
            Array::I16(v) => v.iter().map(|&x| x.into()).collect(),
            Array::U32(v) => v.iter().map(|&x| x.into()).collect(),
            Array::I32(v) => v.iter().map(|&x| x.into()).collect(),
            Array::U64(v) => v.iter().map(|&x| x.into()).collect(),
            Array::I64(v) => v.iter().map(|&x| x.into()).collect(),
            _ => return None,
        })
    }

    pub fn strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    pub fn bools(&self) -> Option<&[bool]> {
        match self {
            Array::Bool(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor as the header describes it, with its place in the file checked.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: dims[0] (ne0) is the row length, the fastest-varying index. The reverse of
    /// the PyTorch/numpy shape.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// As written: relative to the data section.
    pub offset: u64,
    /// Absolute byte range in the file.
    pub start: u64,
    pub len: u64,
}

impl TensorInfo {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Bytes of one row (dims[0] elements).
    pub fn row_bytes(&self) -> u64 {
        self.ggml_type.row_bytes(self.dims[0] as usize).expect("checked when parsed") as u64
    }
    /// The shape in PyTorch order ([.., rows, row length]), as our weight tree writes shapes.
    pub fn torch_shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// Everything before the tensor data.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    /// Key/values in file order.
    pub metadata: Vec<(String, Value)>,
    keys: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
    pub file_len: u64,
}

impl Header {
    /// Parses and checks a whole GGUF file held in `bytes`. `path` only names the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Header> {
        let mut c = Cursor { b: bytes, pos: 0, path };
        if bytes.len() < 4 {
            return Err(c.err(format!("not a GGUF file: only {} bytes", bytes.len())));
        }
        if &bytes[..4] != b"GGUF" {
            return Err(c.err(format!(
                "not a GGUF file: starts with {:?}, expected \"GGUF\"",
                String::from_utf8_lossy(&bytes[..4])
            )));
        }
        c.pos = 4;
        let version = c.u32("version")?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(
                    c.err("GGUF version 1 is not supported (only 2 and 3); re-convert it with a current llama.cpp")
                );
            }
            v if v & 0xffff == 0 && matches!(v.swap_bytes(), 1..=3) => {
                return Err(c.err(format!(
                    "big-endian GGUF (version {} written big-endian); only little-endian files are supported",
                    v.swap_bytes()
                )));
            }
            v => return Err(c.err(format!("unsupported GGUF version {v} (only 2 and 3)"))),
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // A key/value takes at least 13 bytes (key length, type, one value byte); a tensor info 32.
        c.fits(n_kv, 13, "metadata count")?;
        c.fits(n_tensors, 32, "tensor count")?;

        let mut metadata = Vec::with_capacity((n_kv as usize).min(MAX_PREALLOC));
        let mut keys = HashMap::with_capacity((n_kv as usize).min(MAX_PREALLOC));
        for _ in 0..n_kv {
            let at = c.pos;
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata value type")?;
            let value = c.value(ty, 0, &key)?;
            if keys.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.err(format!("metadata key `{key}` appears twice (second at byte {at})")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_int() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= 1 << 30 => a as u64,
                _ => {
                    return Err(c.err(format!(
                        "`general.alignment` is {} ({}); it must be a power of two",
                        v.brief(),
                        v.type_name()
                    )));
                }
            },
        };

        let mut infos = Vec::with_capacity((n_tensors as usize).min(MAX_PREALLOC));
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor n_dims")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.err(format!("tensor `{name}` has n_dims {n_dims} (GGUF allows 1 to {MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension")?);
            }
            // An empty dimension would let the others be anything (the size stays 0).
            if dims.contains(&0) {
                return Err(c.err(format!("tensor `{name}` has a dimension of 0: {dims:?}")));
            }
            let type_id = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            infos.push((name, dims, type_id, offset));
        }
        let file_len = bytes.len() as u64;
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        if !infos.is_empty() && data_start > file_len {
            return Err(c.err(format!(
                "truncated: the data section would start at byte {data_start} but the file has {file_len} bytes"
            )));
        }

        let mut tensors = Vec::with_capacity(infos.len());
        let mut names = HashMap::with_capacity(infos.len());
        for (name, dims, type_id, offset) in infos {
            let ggml_type = GgmlType::from_id(type_id)
                .map_err(|_| c.err(format!("tensor `{name}` has unknown GGML type id {type_id}")))?;
            let shape = dims.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
            let bad = |msg: String| c.err(format!("tensor `{name}` ({} [{shape}]): {msg}", ggml_type.name()));
            let row = usize::try_from(dims[0]).ok().and_then(|d| ggml_type.row_bytes(d).ok()).ok_or_else(|| {
                bad(format!(
                    "a row of {} elements is not a whole number of {}-element blocks",
                    dims[0],
                    ggml_type.block_size()
                ))
            })? as u64;
            let len = dims[1..]
                .iter()
                .try_fold(row, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad("size overflows 64 bits".into()))?;
            if !offset.is_multiple_of(alignment) {
                return Err(bad(format!("offset {offset} is not a multiple of the alignment {alignment}")));
            }
            let start = data_start.checked_add(offset).ok_or_else(|| bad(format!("offset {offset} overflows")))?;
            let end = start.checked_add(len).filter(|&e| e <= file_len).ok_or_else(|| {
                bad(format!("bytes {start}..{} lie outside the file ({file_len} bytes)", start as u128 + len as u128))
            })?;
            debug_assert!(end <= file_len);
            if names.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.err(format!("tensor `{name}` appears twice")));
            }
            tensors.push(TensorInfo { name, dims, ggml_type, offset, start, len });
        }
        let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.len > 0).collect();
        order.sort_by_key(|t| t.start);
        for w in order.windows(2) {
            if w[1].start < w[0].end() {
                return Err(c.err(format!("tensors `{}` and `{}` overlap in the file", w[0].name, w[1].name)));
            }
        }
        Ok(Header { version, metadata, keys, tensors, alignment, data_start, file_len })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.keys.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::file(self.path, format!("GGUF: {}", msg.into()))
    }

    fn left(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    /// Refuses `count` items of at least `each` bytes when they cannot fit in the bytes left.
    fn fits(&self, count: u64, each: u64, what: &str) -> Result<()> {
        if count.checked_mul(each).is_none_or(|n| n > self.left()) {
            return Err(self.err(format!(
                "{what} {count} at byte {} cannot fit in the {} bytes left in the file",
                self.pos,
                self.left()
            )));
        }
        Ok(())
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        if (n as u64) > self.left() {
            return Err(self.err(format!(
                "truncated: {what} at byte {} needs {n} bytes, {} left",
                self.pos,
                self.left()
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.left() {
            return Err(self.err(format!(
                "{what} at byte {at} has length {len}, more than the {} bytes left in the file",
                self.left()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(format!("{what} at byte {at} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: u32, key: &str) -> Result<Value> {
        let what = |t: &str| format!("value of `{key}` ({t})");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what("u8"))?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(&what("i8"))?)),
            2 => Value::U16(u16::from_le_bytes(self.array(&what("u16"))?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what("i16"))?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what("u32"))?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what("i32"))?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what("f32"))?)),
            7 => Value::Bool(self.boolean(key)?),
            8 => Value::String(self.string(&what("string"))?),
            9 => Value::Array(self.array_value(depth, key)?),
            10 => Value::U64(u64::from_le_bytes(self.array(&what("u64"))?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what("i64"))?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what("f64"))?)),
            t => {
                return Err(self.err(format!(
                    "metadata `{key}` has unknown value type {t} at byte {}",
                    self.pos.saturating_sub(4)
                )));
            }
        })
    }

    fn boolean(&mut self, key: &str) -> Result<bool> {
        match self.array::<1>(&format!("value of `{key}` (bool)"))?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("metadata `{key}`: bool byte {b} is neither 0 nor 1"))),
        }
    }

    fn array_value(&mut self, depth: u32, key: &str) -> Result<Array> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(format!("metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
        }
        let item = self.u32("array item type")?;
        let item_name =
            type_name(item).ok_or_else(|| self.err(format!("metadata `{key}`: array of unknown value type {item}")))?;
        let count = self.u64("array count")?;
        self.fits(count, min_size(item), &format!("metadata `{key}`: array of {item_name} with count"))?;
        let n = count as usize;
        macro_rules! plain {
            ($variant:ident, $t:ty) => {{
                const W: usize = std::mem::size_of::<$t>();
                let raw = self.take(n * W, &format!("metadata `{key}` items"))?;
                Array::$variant(
                    raw.chunks_exact(W).map(|c| <$t>::from_le_bytes(c.try_into().expect("W bytes"))).collect(),
                )
            }};
        }
        Ok(match item {
            0 => plain!(U8, u8),
            1 => plain!(I8, i8),
            2 => plain!(U16, u16),
            3 => plain!(I16, i16),
            4 => plain!(U32, u32),
            5 => plain!(I32, i32),
            6 => plain!(F32, f32),
            7 => Array::Bool(read_n(n, || self.boolean(key))?),
            8 => {
                let what = format!("string item of `{key}`");
                Array::String(read_n(n, || self.string(&what))?)
            }
            9 => Array::Array(read_n(n, || self.array_value(depth + 1, key))?),
            10 => plain!(U64, u64),
            11 => plain!(I64, i64),
            12 => plain!(F64, f64),
            _ => unreachable!("type_name accepted it"),
        })
    }
}

/// A mapped GGUF file with its checked header.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    map: Arc<Mmap>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("tensors", &self.header.tensors.len()).finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = flashmoe_text::file::open_regular(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 4 {
            return Err(Error::file(path, format!("GGUF: not a GGUF file: only {len} bytes")));
        }
        // SAFETY: the mapping is read-only. Like every mmap-based loader we rely on the file not
        // being truncated while the model is in use.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, format!("cannot map file: {e}")))?;
        crate::mapped::register(path, map.len() as u64);
        let header = Header::parse(&map[..], path)?;
        Ok(GgufFile { path: path.to_path_buf(), header, map: Arc::new(map) })
    }

    /// The bytes of a tensor of this file, as a view that keeps the mapping alive.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Bytes {
        self.range(t.start, t.len)
    }

    /// Bytes `start..start + len` of the file (a tensor or one expert's slice; checked against
    /// the file when the header was parsed).
    pub fn range(&self, start: u64, len: u64) -> Bytes {
        let map: Arc<dyn ByteSource> = self.map.clone();
        Bytes::new(map, start as usize, len as usize)
    }
}
