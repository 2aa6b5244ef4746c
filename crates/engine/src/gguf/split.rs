//! Split GGUF models (`NAME-00001-of-00003.gguf`, llama.cpp `gguf-split` and the converter's
//! `--split-max-*`): every part is a complete GGUF file; the first holds the model metadata, each
//! holds `split.no` (0-based), `split.count` and `split.tensors.count` (the total over all parts).

use super::reader::{GgufFile, TensorInfo, Value};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// All parts of a model, with one tensor index over them.
#[derive(Debug)]
pub struct GgufParts {
    pub parts: Vec<GgufFile>,
    /// Tensor name → (part, index in that part's header).
    index: HashMap<String, (usize, usize)>,
}

/// `(prefix, part number (1-based), part count)` when the file name follows the split pattern.
pub fn split_name(path: &Path) -> Option<(String, u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    // "-00001-of-00003" is 15 bytes.
    let (prefix, tail) = stem.split_at_checked(stem.len().checked_sub(15)?)?;
    let rest = tail.strip_prefix('-')?;
    let (no, count) = rest.split_once("-of-")?;
    if no.len() != 5 || count.len() != 5 || !no.bytes().chain(count.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((prefix.to_string(), no.parse().ok()?, count.parse().ok()?))
}

fn part_path(dir: &Path, prefix: &str, no: u32, count: u32) -> PathBuf {
    dir.join(format!("{prefix}-{no:05}-of-{count:05}.gguf"))
}

fn int_key(f: &GgufFile, key: &str) -> Result<Option<u64>> {
    match f.header.get(key) {
        None => Ok(None),
        Some(v) => match v.as_int() {
            Some(i) if i >= 0 => Ok(Some(i as u64)),
            _ => Err(Error::file(
                &f.path,
                format!("GGUF: `{key}` is {} ({}), expected a count", v.brief(), v.type_name()),
            )),
        },
    }
}

impl GgufParts {
    /// Opens `path`, and when it is one part of a split, every part (whichever part was given).
    pub fn open(path: &Path) -> Result<GgufParts> {
        let paths = match split_name(path) {
            Some((prefix, no, count)) => {
                if count == 0 || no == 0 || no > count {
                    return Err(Error::file(path, format!("split part number {no} of {count} is impossible")));
                }
                let dir = path.parent().unwrap_or(Path::new("."));
                (1..=count).map(|i| part_path(dir, &prefix, i, count)).collect()
            }
            None => vec![path.to_path_buf()],
        };
        let n = paths.len() as u64;
        let mut parts = Vec::with_capacity(paths.len());
        for (i, p) in paths.iter().enumerate() {
            if !p.exists() {
                return Err(Error::file(
                    p,
                    format!("split part {} of {n} is missing (given {})", i + 1, path.display()),
                ));
            }
            parts.push(GgufFile::open(p)?);
        }
        let total = match (n, int_key(&parts[0], "split.count")?) {
            (1, None | Some(1)) => None,
            (1, Some(c)) => {
                return Err(Error::file(
                    path,
                    format!(
                        "GGUF: `split.count` is {c}, but the file name does not follow NAME-00001-of-{c:05}.gguf, so the other parts cannot be found"
                    ),
                ));
            }
            _ => {
                let mut total = None;
                for (i, f) in parts.iter().enumerate() {
                    let no = int_key(f, "split.no")?;
                    let count = int_key(f, "split.count")?;
                    let tensors = int_key(f, "split.tensors.count")?;
                    if no != Some(i as u64) || count != Some(n) {
                        return Err(Error::file(
                            &f.path,
                            format!(
                                "GGUF: split metadata says part {} of {}, but the file name says part {} of {n}",
                                no.map_or("?".into(), |v| (v + 1).to_string()),
                                count.map_or("?".into(), |v| v.to_string()),
                                i + 1
                            ),
                        ));
                    }
                    let Some(t) = tensors else {
                        return Err(Error::file(&f.path, "GGUF: split part without `split.tensors.count`"));
                    };
                    if total.is_some_and(|x| x != t) {
                        return Err(Error::file(
                            &f.path,
                            format!(
                                "GGUF: `split.tensors.count` is {t}, but the first part says {}",
                                total.unwrap_or(0)
                            ),
                        ));
                    }
                    total = Some(t);
                }
                total
            }
        };
        let mut index = HashMap::new();
        for (p, f) in parts.iter().enumerate() {
            for (i, t) in f.header.tensors.iter().enumerate() {
                if let Some((q, _)) = index.insert(t.name.clone(), (p, i)) {
                    return Err(Error::file(
                        &f.path,
                        format!("GGUF: tensor `{}` is also in {}", t.name, parts[q].path.display()),
                    ));
                }
            }
        }
        if let Some(t) = total
            && t != index.len() as u64
        {
            return Err(Error::file(
                path,
                format!("GGUF: `split.tensors.count` is {t}, but the {n} parts hold {} tensors", index.len()),
            ));
        }
        Ok(GgufParts { parts, index })
    }

    /// Model metadata: the first part's (the other parts only carry the split keys).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.parts[0].header.get(key)
    }

    pub fn path(&self) -> &Path {
        &self.parts[0].path
    }

    /// `(part, tensor)` of a tensor name.
    pub fn tensor(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        self.index.get(name).map(|&(p, i)| (p, &self.parts[p].header.tensors[i]))
    }

    /// Every tensor with its part, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = (usize, &TensorInfo)> {
        self.parts.iter().enumerate().flat_map(|(p, f)| f.header.tensors.iter().map(move |t| (p, t)))
    }

    pub fn tensor_count(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        let p = |s: &str| split_name(Path::new(s));
        assert_eq!(p("/m/Qwen3.5-397B-Q4_K_M-00002-of-00006.gguf"), Some(("Qwen3.5-397B-Q4_K_M".into(), 2, 6)));
        assert_eq!(p("a-00001-of-00001.gguf"), Some(("a".into(), 1, 1)));
        assert_eq!(p("model.gguf"), None);
        assert_eq!(p("m-0001-of-0002.gguf"), None, "five digits each");
        assert_eq!(p("m-00001-of-00002.bin"), None);
        assert_eq!(p("-00001-of-00002.gguf"), Some((String::new(), 1, 2)));
        assert_eq!(p("x-0000a-of-00002.gguf"), None);
    }
}
