//! GGML tensor types as GGUF stores them: id → name, elements per block, bytes per block. This
//! table is only for size and range checks; computing with the blocks (dequantize, dot) is the
//! kernels crate's job. Values from gguf-py `GGML_QUANT_SIZES` / ggml's `type_traits`.

/// One GGML tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Elements per block (1 for plain types); a row's element count must be a multiple of it.
    pub block_elems: u64,
    pub block_bytes: u64,
}

impl GgmlType {
    /// The type of GGUF id `id`, or None for ids that ggml never assigned or has removed
    /// (4, 5: Q4_2/Q4_3; 31–33, 36–38: repacked types that are never written to files).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().copied().find(|t| t.id == id)
    }

    /// Bytes of one row of `elems` elements; None when `elems` is not a whole number of blocks
    /// or the size overflows.
    pub fn row_bytes(&self, elems: u64) -> Option<u64> {
        if !elems.is_multiple_of(self.block_elems) {
            return None;
        }
        (elems / self.block_elems).checked_mul(self.block_bytes)
    }

    /// True for the types stored as plain numbers (no blocks).
    pub fn is_plain(&self) -> bool {
        self.block_elems == 1
    }
}

const fn t(id: u32, name: &'static str, block_elems: u64, block_bytes: u64) -> GgmlType {
    GgmlType { id, name, block_elems, block_bytes }
}

pub const TYPES: &[GgmlType] = &[
    t(0, "F32", 1, 4),
    t(1, "F16", 1, 2),
    t(2, "Q4_0", 32, 18),
    t(3, "Q4_1", 32, 20),
    t(6, "Q5_0", 32, 22),
    t(7, "Q5_1", 32, 24),
    t(8, "Q8_0", 32, 34),
    t(9, "Q8_1", 32, 40),
    t(10, "Q2_K", 256, 84),
    t(11, "Q3_K", 256, 110),
    t(12, "Q4_K", 256, 144),
    t(13, "Q5_K", 256, 176),
    t(14, "Q6_K", 256, 210),
    t(15, "Q8_K", 256, 292),
    t(16, "IQ2_XXS", 256, 66),
    t(17, "IQ2_XS", 256, 74),
    t(18, "IQ3_XXS", 256, 98),
    t(19, "IQ1_S", 256, 50),
    t(20, "IQ4_NL", 32, 18),
    t(21, "IQ3_S", 256, 110),
    t(22, "IQ2_S", 256, 82),
    t(23, "IQ4_XS", 256, 136),
    t(24, "I8", 1, 1),
    t(25, "I16", 1, 2),
    t(26, "I32", 1, 4),
    t(27, "I64", 1, 8),
    t(28, "F64", 1, 8),
    t(29, "IQ1_M", 256, 56),
    t(30, "BF16", 1, 2),
    t(34, "TQ1_0", 256, 54),
    t(35, "TQ2_0", 256, 66),
    t(39, "MXFP4", 32, 17),
    t(40, "NVFP4", 64, 36),
    t(41, "Q1_0", 128, 18),
];

/// `general.file_type` (llama.cpp `llama_ftype`) as the name llama.cpp prints.
pub fn file_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        39 => "NVFP4",
        40 => "Q1_0",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_sizes() {
        let q4k = GgmlType::from_id(12).unwrap();
        assert_eq!(q4k.name, "Q4_K");
        assert_eq!(q4k.row_bytes(4096), Some(16 * 144));
        assert_eq!(q4k.row_bytes(100), None, "not a whole block");
        assert_eq!(GgmlType::from_id(30).unwrap().row_bytes(3), Some(6));
        assert!(GgmlType::from_id(4).is_none(), "Q4_2 was removed");
        assert!(TYPES.windows(2).all(|w| w[0].id < w[1].id));
    }
}
