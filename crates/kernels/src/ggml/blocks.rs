//! Portable block decoders, one per supported type, written from the block
//! layouts of ggml-common.h. Each computes exactly the float32 operations
//! gguf-py's `dequantize_blocks` does, in its order (a product and a
//! difference stay two roundings; no fused multiply-add), so the results
//! are bit-identical.

use super::{GgmlType, QK_K};

/// Values of the 4-bit non-linear codes of IQ4_NL and IQ4_XS
/// (`kvalues_iq4nl` in ggml-common.h).
pub(super) const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

#[inline(always)]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Decoder of one block of `block_size` elements.
type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(ty: GgmlType) -> BlockFn {
    use GgmlType::*;
    match ty {
        F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        F16 => |b, o| o[0] = f16_at(b, 0),
        BF16 => |b, o| o[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        Q4_0 => q4_0,
        Q4_1 => q4_1,
        Q5_0 => q5_0,
        Q5_1 => q5_1,
        Q8_0 => q8_0,
        Q2_K => q2_k,
        Q3_K => q3_k,
        Q4_K => q4_k,
        Q5_K => q5_k,
        Q6_K => q6_k,
        IQ4_NL => iq4_nl,
        IQ4_XS => iq4_xs,
        _ => unreachable!("{ty} is checked as supported before decoding"),
    }
}

/// Dequantizes a row whose length was checked against `out`.
pub(super) fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let f = block_fn(ty);
    for (b, o) in bytes.chunks_exact(ty.type_size()).zip(out.chunks_exact_mut(ty.block_size())) {
        f(b, o);
    }
}

/// Portable dot product: decode a block, dot it with its slice of x, add.
pub(super) fn dot(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let f = block_fn(ty);
    let bs = ty.block_size();
    // Float types have one-element blocks; decode them in runs to keep the
    // per-call overhead out of the loop.
    let run = if bs == 1 { 64 } else { 1 };
    let mut buf = [0.0f32; QK_K];
    let mut total = 0.0f32;
    for (bb, xb) in row.chunks(ty.type_size() * run).zip(x.chunks(bs * run)) {
        let w = &mut buf[..xb.len()];
        for (b, o) in bb.chunks_exact(ty.type_size()).zip(w.chunks_exact_mut(bs)) {
            f(b, o);
        }
        total += crate::scalar::dot(w, xb);
    }
    total
}

fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        o[j] = d * ((qs[j] & 0xF) as i32 - 8) as f32;
        o[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        o[j] = d * (qs[j] & 0xF) as f32 + m;
        o[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// 5-bit codes: low nibbles in `qs`, fifth bits in the u32 `qh` (bit j of
/// qh belongs to element j).
fn q5_codes(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) | (((qh >> j) & 1) as u8) << 4;
        q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) as u8) << 4;
    }
    q
}

fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (oj, q) in o.iter_mut().zip(q5_codes(&b[2..6], &b[6..22])) {
        *oj = d * (q as i32 - 16) as f32;
    }
}

fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (oj, q) in o.iter_mut().zip(q5_codes(&b[4..8], &b[8..24])) {
        *oj = d * q as f32 + m;
    }
}

fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (oj, &q) in o.iter_mut().zip(&b[2..34]) {
        *oj = (q as i8) as f32 * d;
    }
}

fn q2_k(b: &[u8], o: &mut [f32]) {
    let (sc, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (e, oe) in o.iter_mut().enumerate() {
        // Element e: half e/128, 2-bit plane (e%128)/32, byte e%32.
        let q = (qs[e / 128 * 32 + e % 32] >> (2 * (e % 128 / 32))) & 3;
        let s = sc[e / 16];
        let dl = d * (s & 0xF) as f32;
        let ml = dmin * (s >> 4) as f32;
        *oe = dl * q as f32 - ml;
    }
}

fn q3_k(b: &[u8], o: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let d = f16_at(b, 108);
    let sc = q3_k_scale_bytes(&b[96..108]);
    let dl: [f32; 16] = std::array::from_fn(|i| d * (sc[i] as i32 - 32) as f32);
    for (e, oe) in o.iter_mut().enumerate() {
        let low = (qs[e / 128 * 32 + e % 32] >> (2 * (e % 128 / 32))) & 3;
        // A clear high bit means -4 (ggml stores the bit inverted).
        let high = (hmask[e % 32] >> (e / 32)) & 1;
        let q = low as i32 - if high == 0 { 4 } else { 0 };
        *oe = dl[e / 16] * q as f32;
    }
}

/// [`q3_k_scales`] as sixteen bytes, scale j in byte j.
#[inline(always)]
pub(super) fn q3_k_scale_bytes(s: &[u8]) -> [u8; 16] {
    let (first, second) = q3_k_scales(s);
    ((first as u128) | (second as u128) << 64).to_le_bytes()
}

/// The sixteen 6-bit scales of a Q3_K super-block (unsigned, 32 above the signed scale), packed
/// in 12 bytes: the low 4 bits of scales 0..8 are the low nibbles of bytes 0..8 and those of
/// scales 8..16 their high nibbles; the top 2 bits of scale j are bits 2·(j / 4)..+2 of byte
/// 8 + j % 4. Returned as the bytes of two u64 (scales 0..8, then 8..16), eight bytes per word
/// operation.
#[inline(always)]
pub(super) fn q3_k_scales(s: &[u8]) -> (u64, u64) {
    let a = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
    let c = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let (low4, top2) = (0x0F0F_0F0F_0F0F_0F0F, 0x0303_0303);
    // Top bits of scales 4k..4k+4 are the bit pair 2k of bytes 8..12.
    let top = |k: u32| ((c >> (2 * k)) & top2) as u64;
    let first = (a & low4) | (top(0) | top(1) << 32) << 4;
    let second = ((a >> 4) & low4) | (top(2) | top(3) << 32) << 4;
    (first, second)
}

/// The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K super-block, packed in
/// 12 bytes (`get_scale_min_k4` in ggml).
#[inline(always)]
pub(super) fn k4_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (sc, mn) = k4_scales_words(s);
    (sc.to_le_bytes(), mn.to_le_bytes())
}

/// [`k4_scales`] as the bytes of two u64 (scale j in byte j), four bytes per word operation:
/// bytes 0..4 of `s` hold scales 0..4 in their low 6 bits, bytes 4..8 minimums 0..4; bytes
/// 8..12 hold the low 4 bits of scales 4..8 (low nibble) and minimums 4..8 (high nibble), whose
/// top 2 bits are the top bits of bytes 0..4 and 4..8.
#[inline(always)]
pub(super) fn k4_scales_words(s: &[u8]) -> (u64, u64) {
    let word = |o: usize| u32::from_le_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let (low6, low4, top2) = (0x3F3F_3F3F, 0x0F0F_0F0F, 0x3030_3030);
    let sc = (a & low6) as u64 | (((c & low4) | ((a >> 2) & top2)) as u64) << 32;
    let mn = (b & low6) as u64 | ((((c >> 4) & low4) | ((b >> 2) & top2)) as u64) << 32;
    (sc, mn)
}

fn q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = k4_scales(&b[4..16]);
    let qs = &b[16..144];
    for (e, oe) in o.iter_mut().enumerate() {
        // 32-byte chunk e/64: low nibbles for the first 32 elements, high for the next.
        let q = (qs[e / 64 * 32 + e % 32] >> (4 * (e % 64 / 32))) & 0xF;
        let sub = e / 32;
        *oe = (d * sc[sub] as f32) * q as f32 - dmin * mn[sub] as f32;
    }
}

fn q5_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = k4_scales(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (e, oe) in o.iter_mut().enumerate() {
        let low = (qs[e / 64 * 32 + e % 32] >> (4 * (e % 64 / 32))) & 0xF;
        let high = (qh[e % 32] >> (e / 32)) & 1;
        let sub = e / 32;
        *oe = (d * sc[sub] as f32) * (low | high << 4) as f32 - dmin * mn[sub] as f32;
    }
}

fn q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (e, oe) in o.iter_mut().enumerate() {
        // Half h = e/128; within it, quarter t of 32 elements.
        let (h, t, l) = (e / 128, e % 128 / 32, e % 32);
        let low = (ql[h * 64 + (t % 2) * 32 + l] >> (4 * (t / 2))) & 0xF;
        let high = (qh[h * 32 + l] >> (2 * t)) & 3;
        let q = (low | high << 4) as i32 - 32;
        *oe = (d * (sc[e / 16] as i8) as f32) * q as f32;
    }
}

fn iq4_nl(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        o[j] = d * KVALUES_IQ4NL[(qs[j] & 0xF) as usize] as f32;
        o[j + 16] = d * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
    }
}

/// The eight 6-bit signed sub-block scales of an IQ4_XS block.
#[inline(always)]
pub(super) fn iq4_xs_scales(b: &[u8]) -> [i32; 8] {
    let high = u16::from_le_bytes([b[2], b[3]]);
    let low = &b[4..8];
    let mut ls = [0i32; 8];
    for (ib, l) in ls.iter_mut().enumerate() {
        let lo = (low[ib / 2] >> (4 * (ib % 2))) & 0xF;
        let hi = ((high >> (2 * ib)) & 3) as u8;
        *l = (lo | hi << 4) as i32 - 32;
    }
    ls
}

fn iq4_xs(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let ls = iq4_xs_scales(b);
    let qs = &b[8..136];
    for (e, oe) in o.iter_mut().enumerate() {
        let ib = e / 32;
        let q = (qs[ib * 16 + e % 16] >> (4 * (e % 32 / 16))) & 0xF;
        *oe = (d * ls[ib] as f32) * KVALUES_IQ4NL[q as usize] as f32;
    }
}
