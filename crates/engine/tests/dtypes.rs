//! bf16 and f16 checkpoints: the f32 fixture re-saved in half precision must give the same logits
//! as an f32 checkpoint holding exactly the rounded values (so the half-precision weight paths are
//! checked to f32 accuracy; a random model is too chaotic to compare against the unrounded one).

use flashmoe::{LogitsFor, Model};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen35-moe-tiny-flat")
}

/// Writes the fixture with every tensor rounded to `dtype`, stored as `store_as` (the rounded
/// type itself, or F32 holding the rounded values).
fn convert(dtype: Dtype, store_as: Dtype) -> tempfile_dir::Dir {
    let dir = tempfile_dir::Dir::new(&format!("{dtype:?}-{store_as:?}"));
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture().join(f), dir.path.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), Dtype::F32);
        let vals = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
        let data: Vec<u8> = match (dtype, store_as) {
            (Dtype::BF16, Dtype::BF16) => vals.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            (Dtype::F16, Dtype::F16) => vals.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
            (Dtype::BF16, Dtype::F32) => vals.flat_map(|v| half::bf16::from_f32(v).to_f32().to_le_bytes()).collect(),
            (Dtype::F16, Dtype::F32) => vals.flat_map(|v| half::f16::from_f32(v).to_f32().to_le_bytes()).collect(),
            _ => unreachable!(),
        };
        out.push((name, data, t.shape().to_vec()));
    }
    let views: Vec<(String, TensorView)> =
        out.iter().map(|(n, d, s)| (n.clone(), TensorView::new(store_as, s.clone(), d).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.path.join("model.safetensors")).unwrap();
    dir
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    d / b.iter().map(|x| x.abs()).fold(0.0, f32::max)
}

#[test]
fn half_precision_checkpoints_match_f32_of_the_rounded_values() {
    let ids = [5u32, 17, 200, 33, 299, 64, 1];
    let original = Model::load(&fixture()).unwrap();
    let mut st = original.new_state();
    let unrounded = original.forward(&ids, &mut st, LogitsFor::All).unwrap();
    for dtype in [Dtype::BF16, Dtype::F16] {
        let rounded_f32 = Model::load(&convert(dtype, Dtype::F32).path).unwrap();
        let mut st = rounded_f32.new_state();
        let want = rounded_f32.forward(&ids, &mut st, LogitsFor::All).unwrap();
        let m = Model::load(&convert(dtype, dtype).path).unwrap();
        assert_eq!(m.weight_bytes().1 * 2, original.weight_bytes().1);
        for decode in [false, true] {
            let mut st = m.new_state();
            let got = if decode {
                ids.iter().flat_map(|&id| m.forward(&[id], &mut st, LogitsFor::Last).unwrap()).collect()
            } else {
                m.forward(&ids, &mut st, LogitsFor::All).unwrap()
            };
            let e = max_rel(&got, &want);
            eprintln!(
                "{dtype:?} decode={decode}: vs f32 of rounded weights {e:.2e}, vs unrounded {:.2e}",
                max_rel(&got, &unrounded)
            );
            assert!(e < 1e-5, "{dtype:?} decode={decode}: {e}");
        }
    }
}

/// A scratch directory removed on drop (kept dependency-free).
mod tempfile_dir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!("flashmoe-dtype-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
