//! GGUF block quantization kernels against gguf-py: the fixtures in
//! testdata/gguf/quants were written by scripts/fixtures/gguf_quants.py
//! with gguf 0.17.1 (`gguf.quants.dequantize` and `GGML_QUANT_SIZES`).

use std::path::PathBuf;

use flashmoe_kernels::cpu_features::SimdLevel;
use flashmoe_kernels::ggml::{self, GgmlType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/gguf/quants")
}

fn read(name: &str) -> Vec<u8> {
    let p = fixture_dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Raw blocks and gguf-py's dequantization of them.
fn fixture(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let raw = read(&format!("{}.bin", ty.name()));
    let want = read(&format!("{}.f32", ty.name()))
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (raw, want)
}

fn levels() -> Vec<SimdLevel> {
    SimdLevel::ALL.into_iter().filter(|l| l.is_supported()).collect()
}

/// Copies `bytes` to an odd address so that no load can rely on alignment.
fn misaligned(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut v = vec![0u8; bytes.len() + 8];
    let start = (8 - v.as_ptr() as usize % 8) % 8 + 1;
    v[start..start + bytes.len()].copy_from_slice(bytes);
    (v, start)
}

#[test]
fn type_table_matches_gguf_py() {
    let text = String::from_utf8(read("types.txt")).unwrap();
    let mut seen = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (name, id, bs, ts): (&str, u32, usize, usize) =
            (f[0], f[1].parse().unwrap(), f[2].parse().unwrap(), f[3].parse().unwrap());
        let ty = GgmlType::from_id(id).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((ty.name(), ty.id(), ty.block_size(), ty.type_size()), (name, id, bs, ts), "{line}");
        seen += 1;
    }
    // gguf-py 0.17.1 predates MXFP4, NVFP4 and Q1_0 (ids 39-41); every other type is in its
    // table (the three are checked against gguf-py 0.19.0's sizes in the GGUF reader's tests).
    assert_eq!(seen, GgmlType::ALL.len() - 3);
    assert_eq!(GgmlType::from_id(39).unwrap(), GgmlType::MXFP4);
    for id in [4, 5, 31, 32, 33, 36, 38, 42, 1000, u32::MAX] {
        let e = GgmlType::from_id(id).unwrap_err().to_string();
        assert!(e.contains(&format!("id {id}")), "{e}");
    }
}

#[test]
fn dequantize_bit_exact_to_gguf_py_on_every_level() {
    for ty in GgmlType::SUPPORTED {
        let (raw, want) = fixture(ty);
        let (buf, start) = misaligned(&raw);
        let row = &buf[start..start + raw.len()];
        let mut got = vec![f32::NAN; want.len()];
        ggml::dequantize_row(ty, row, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{ty} element {i}: got {g:e}, gguf-py {w:e}");
        }
        for level in levels() {
            let mut got = vec![f32::NAN; want.len()];
            ggml::dequantize_row_at(level, ty, row, &mut got).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{ty} on {} element {i}: got {g:e}, gguf-py {w:e}", level.name());
            }
        }
    }
}

/// Σ w·x in f64 and Σ |w·x|, the scale the f32 error is measured against.
fn reference_dot(w: &[f32], x: &[f32]) -> (f64, f64) {
    w.iter().zip(x).fold((0.0, 0.0), |(s, a), (&w, &x)| (s + w as f64 * x as f64, a + (w as f64 * x as f64).abs()))
}

fn assert_close(got: f32, want: (f64, f64), what: &str) {
    let err = (got as f64 - want.0).abs();
    assert!(err <= 1e-5 * want.1 + 1e-30, "{what}: got {got:e}, want {:e} (Σ|wx| {:e}, err {err:e})", want.0, want.1);
}

#[test]
fn dot_row_matches_gguf_py_dequantization_on_every_level() {
    let mut rng = StdRng::seed_from_u64(7);
    // The F32 and BF16 fixtures are random bit patterns over the whole
    // exponent range, so their f32 dot overflows; dot_and_matvec_* covers them.
    for ty in GgmlType::SUPPORTED.into_iter().filter(|t| !matches!(t, GgmlType::F32 | GgmlType::BF16)) {
        let (raw, want) = fixture(ty);
        let x: Vec<f32> = (0..want.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (buf, start) = misaligned(&raw);
        let row = &buf[start..start + raw.len()];
        for level in levels() {
            let got = ggml::dot_row_at(level, ty, row, &x).unwrap();
            assert_close(got, reference_dot(&want, &x), &format!("{ty} on {}", level.name()));
            // One block at a time: the shortest rows.
            let (bs, ts) = (ty.block_size().max(8), ty.type_size() * ty.block_size().max(8) / ty.block_size());
            for (b, (bb, xb)) in row.chunks(ts).zip(x.chunks(bs)).enumerate().take(4) {
                let got = ggml::dot_row_at(level, ty, bb, xb).unwrap();
                let wb = &want[b * bs..(b + 1) * bs];
                assert_close(got, reference_dot(wb, xb), &format!("{ty} block {b} on {}", level.name()));
            }
        }
    }
}

/// Byte offsets of the f16 scale fields of each quantized block type, as in
/// ggml-common.h; they get finite values so the data has no NaN/Inf.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL | IQ4_XS => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[],
    }
}

/// A random `[rows, cols]` matrix of type `ty` with finite values.
fn random_matrix(rng: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols / ty.block_size();
    let mut data = vec![0u8; n * ty.type_size()];
    rng.fill(&mut data[..]);
    for block in data.chunks_exact_mut(ty.type_size()) {
        let value = match ty {
            GgmlType::F32 => {
                block.copy_from_slice(&rng.random_range(-2.0f32..2.0).to_le_bytes());
                continue;
            }
            GgmlType::F16 => half::f16::from_f32(rng.random_range(-2.0..2.0)).to_le_bytes(),
            GgmlType::BF16 => half::bf16::from_f32(rng.random_range(-2.0..2.0)).to_le_bytes(),
            _ => {
                for &off in f16_fields(ty) {
                    let s = rng.random_range(1e-3f32..0.5) * if rng.random() { 1.0 } else { -1.0 };
                    block[off..off + 2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
                }
                continue;
            }
        };
        block.copy_from_slice(&value);
    }
    data
}

#[test]
fn dot_and_matvec_match_dequantize_then_f64_dot() {
    let mut rng = StdRng::seed_from_u64(11);
    // 64 × 4096 reaches the parallel matvec path; 3 × 512 the serial one; 2 × 288 (nine
    // 32-element blocks) an odd number of blocks, which kernels that take blocks in pairs
    // finish alone; 2 × 416 (13 blocks) an odd number of Q4_0's four-block steps and a tail.
    for (rows, cols) in [(3, 512), (64, 4096), (2, 288), (2, 416)] {
        for ty in GgmlType::SUPPORTED.into_iter().filter(|t| cols % t.block_size() == 0) {
            let data = random_matrix(&mut rng, ty, rows, cols);
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let rb = ty.row_bytes(cols).unwrap();
            let mut w = vec![0.0f32; cols];
            let want: Vec<(f64, f64)> = (0..rows)
                .map(|r| {
                    ggml::dequantize_row(ty, &data[r * rb..(r + 1) * rb], &mut w).unwrap();
                    reference_dot(&w, &x)
                })
                .collect();
            for level in levels() {
                let what = format!("{ty} [{rows}, {cols}] on {}", level.name());
                let mut y = vec![f32::NAN; rows];
                ggml::matvec_at(level, ty, &data, &x, &mut y).unwrap();
                for (r, (&yr, &wr)) in y.iter().zip(&want).enumerate() {
                    assert_close(yr, wr, &format!("matvec {what} row {r}"));
                    let d = ggml::dot_row_at(level, ty, &data[r * rb..(r + 1) * rb], &x).unwrap();
                    assert_close(d, wr, &format!("dot_row {what} row {r}"));
                }
            }
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let x = vec![0.0f32; 256];
    let mut out = vec![0.0f32; 256];
    let row = vec![0u8; GgmlType::Q4_K.type_size()];
    // Wrong byte length.
    let e = ggml::dot_row(GgmlType::Q4_K, &row[1..], &x).unwrap_err().to_string();
    assert!(e.contains("needs 144 bytes, got 143"), "{e}");
    // Not a whole number of blocks.
    let e = ggml::dequantize_row(GgmlType::Q4_K, &row, &mut out[..200]).unwrap_err().to_string();
    assert!(e.contains("not a whole number of 256-element blocks"), "{e}");
    // Known but unsupported types.
    for ty in [GgmlType::Q8_K, GgmlType::IQ2_XXS, GgmlType::MXFP4, GgmlType::I8] {
        let bytes = vec![0u8; ty.row_bytes(256).unwrap()];
        let e = ggml::dequantize_row(ty, &bytes, &mut out).unwrap_err().to_string();
        assert!(e.contains("not supported yet") && e.contains(ty.name()), "{e}");
    }
    // Matrix length that is not rows × row bytes.
    let mut y = vec![0.0f32; 2];
    let e = ggml::matvec(GgmlType::Q4_K, &row, &x, &mut y).unwrap_err().to_string();
    assert!(e.contains("needs 288 bytes, got 144"), "{e}");
    // Huge claimed sizes fail cleanly instead of overflowing.
    assert!(GgmlType::F32.row_bytes(usize::MAX).is_err());
}

#[test]
fn empty_rows() {
    let mut y = vec![1.0f32; 3];
    ggml::matvec(GgmlType::Q6_K, &[], &[], &mut y).unwrap();
    assert_eq!(y, [0.0; 3]);
    assert_eq!(ggml::dot_row(GgmlType::Q8_0, &[], &[]).unwrap(), 0.0);
}
