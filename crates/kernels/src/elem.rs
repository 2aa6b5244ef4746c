//! Little-endian float element decoding from possibly unaligned byte slices.
//!
//! Kernels are generic over these marker types so that the dtype branch is
//! resolved at compile time instead of once per element.

use crate::FloatType;

pub(crate) trait Elem: Copy + Send + Sync + 'static {
    const DTYPE: FloatType;
    const SIZE: usize;
    /// Reads element `i`; panics when out of bounds.
    fn get(bytes: &[u8], i: usize) -> f32;
    /// Reads element `i` of the array starting at `p` without bounds checks.
    ///
    /// # Safety
    /// `p + (i + 1) * SIZE` bytes must be readable.
    unsafe fn get_raw(p: *const u8, i: usize) -> f32;
}

#[derive(Clone, Copy)]
pub(crate) struct F32E;
#[derive(Clone, Copy)]
pub(crate) struct F16E;
#[derive(Clone, Copy)]
pub(crate) struct Bf16E;

impl Elem for F32E {
    const DTYPE: FloatType = FloatType::F32;
    const SIZE: usize = 4;
    #[inline(always)]
    fn get(bytes: &[u8], i: usize) -> f32 {
        let b: [u8; 4] = bytes[i * 4..i * 4 + 4].try_into().unwrap();
        f32::from_le_bytes(b)
    }
    #[inline(always)]
    unsafe fn get_raw(p: *const u8, i: usize) -> f32 {
        f32::from_le_bytes(unsafe { p.add(i * 4).cast::<[u8; 4]>().read_unaligned() })
    }
}

impl Elem for F16E {
    const DTYPE: FloatType = FloatType::F16;
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(bytes: &[u8], i: usize) -> f32 {
        let b: [u8; 2] = bytes[i * 2..i * 2 + 2].try_into().unwrap();
        half::f16::from_bits(u16::from_le_bytes(b)).to_f32()
    }
    #[inline(always)]
    unsafe fn get_raw(p: *const u8, i: usize) -> f32 {
        let b = unsafe { p.add(i * 2).cast::<[u8; 2]>().read_unaligned() };
        half::f16::from_bits(u16::from_le_bytes(b)).to_f32()
    }
}

impl Elem for Bf16E {
    const DTYPE: FloatType = FloatType::BF16;
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(bytes: &[u8], i: usize) -> f32 {
        let b: [u8; 2] = bytes[i * 2..i * 2 + 2].try_into().unwrap();
        f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
    }
    #[inline(always)]
    unsafe fn get_raw(p: *const u8, i: usize) -> f32 {
        let b = unsafe { p.add(i * 2).cast::<[u8; 2]>().read_unaligned() };
        f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
    }
}

/// Reads word `i` of an unaligned little-endian u32 stream.
#[inline(always)]
pub(crate) fn get_u32(bytes: &[u8], i: usize) -> u32 {
    let b: [u8; 4] = bytes[i * 4..i * 4 + 4].try_into().unwrap();
    u32::from_le_bytes(b)
}

/// Calls `$body` with the type alias `$E` bound to the marker type of `$dtype`.
macro_rules! with_elem {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            $crate::FloatType::F32 => {
                type $E = $crate::elem::F32E;
                $body
            }
            $crate::FloatType::F16 => {
                type $E = $crate::elem::F16E;
                $body
            }
            $crate::FloatType::BF16 => {
                type $E = $crate::elem::Bf16E;
                $body
            }
        }
    };
}
pub(crate) use with_elem;
