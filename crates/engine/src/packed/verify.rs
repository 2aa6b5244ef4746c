//! `flashmoe verify`: checks a packed model's files against its manifest (sizes and xxh3
//! checksums of every non-expert tensor and every expert blob) and names the first bad one.

use super::*;

#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub tensors: usize,
    pub experts: usize,
    pub bytes: u64,
}

pub fn verify(dir: &Path) -> Result<VerifyReport> {
    let m = Manifest::load(dir)?;
    let mut rep = VerifyReport::default();
    let wpath = dir.join(&m.weights_file);
    let wmap = map_file(&wpath)?;
    for e in &m.tensors {
        let end = (e.offset + e.nbytes) as usize;
        if end > wmap.len() {
            return Err(Error::file(
                &wpath,
                format!("tensor `{}` ends at byte {end} but the file has {} bytes (truncated?)", e.name, wmap.len()),
            ));
        }
        if let Some(want) = &e.xxh3 {
            let got = xxh3_hex(&wmap[e.offset as usize..end]);
            if &got != want {
                return Err(Error::file(
                    &wpath,
                    format!("tensor `{}` (bytes {}..{end}) fails its checksum", e.name, e.offset),
                ));
            }
        }
        rep.tensors += 1;
        rep.bytes += e.nbytes;
    }
    for ef in &m.experts {
        let path = dir.join(&ef.file);
        let map = map_file(&path)?;
        let want = ef.stride * ef.num_experts as u64;
        if map.len() as u64 != want {
            return Err(Error::file(
                &path,
                format!("has {} bytes, expected {want} ({} experts × {})", map.len(), ef.num_experts, ef.stride),
            ));
        }
        if ef.xxh3.len() != ef.num_experts {
            return Err(Error::file(
                dir.join(MANIFEST),
                format!("layer {} lists {} checksums for {} experts", ef.layer, ef.xxh3.len(), ef.num_experts),
            ));
        }
        for (x, sum) in ef.xxh3.iter().enumerate() {
            let a = x * ef.stride as usize;
            if &xxh3_hex(&map[a..a + ef.stride as usize]) != sum {
                return Err(Error::file(
                    &path,
                    format!(
                        "expert {x} of layer {} (bytes {a}..{}) fails its checksum",
                        ef.layer,
                        a + ef.stride as usize
                    ),
                ));
            }
            rep.experts += 1;
            rep.bytes += ef.stride;
        }
    }
    Ok(rep)
}
