//! GGML tensor types as GGUF stores them. The type table (id, name, block size and bytes) is the
//! kernels crate's, which also computes with the blocks; this module adds the names of
//! llama.cpp's file types.

pub use flashmoe_kernels::ggml::GgmlType;

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
        assert_eq!(q4k.name(), "Q4_K");
        assert_eq!(q4k.row_bytes(4096).unwrap(), 16 * 144);
        assert!(q4k.row_bytes(100).is_err(), "not a whole block");
        assert_eq!(GgmlType::from_id(30).unwrap().row_bytes(3).unwrap(), 6);
        assert!(GgmlType::from_id(4).is_err(), "Q4_2 was removed");
        // gguf-py 0.19.0's GGML_QUANT_SIZES for the types newer than the kernels' fixtures.
        for (id, bs, ts) in [(39, 32, 17), (40, 64, 36), (41, 128, 18)] {
            let t = GgmlType::from_id(id).unwrap();
            assert_eq!((t.block_size(), t.type_size()), (bs, ts), "{t}");
        }
    }
}
