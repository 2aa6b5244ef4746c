//! A model split by layers over several backends (what `--device cuda:0,1` does with GPUs),
//! checked on CPU backends against the same model on one: the layer numbers the hooks hear
//! (routing trace, per-layer times, prefetch guesses), cloned sequence states, and the errors of
//! a split that cannot be made. Logits against transformers are in reference.rs ("cpu-split-3",
//! "cuda-split").

use flashmoe::backend::cpu::CpuBackend;
use flashmoe::{LoadOptions, LogitsFor, Model};
use std::path::PathBuf;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen35-moe-tiny")
}

fn opts() -> LoadOptions {
    LoadOptions { trace_routing: true, timing: true, prefetch: true, ..Default::default() }
}

#[test]
fn hooks_hear_the_models_layer_numbers_from_every_stage() {
    let one = Model::load_on(&tiny(), &opts(), CpuBackend).unwrap();
    let three = Model::load_on_split(&tiny(), &opts(), vec![CpuBackend, CpuBackend, CpuBackend]).unwrap();
    let layers = one.config.num_layers;
    let prompt = [1u32, 5, 9, 200, 17];
    let mut runs = Vec::new();
    for m in [&one, &three] {
        let mut s = m.new_state();
        let mut logits = m.forward(&prompt, &mut s, LogitsFor::Last).unwrap();
        for _ in 0..4 {
            let next = (0..logits.len()).max_by(|&i, &j| logits[i].total_cmp(&logits[j])).unwrap() as u32;
            logits = m.forward(&[next], &mut s, LogitsFor::Last).unwrap();
        }
        let trace: Vec<(usize, usize, Vec<u32>)> =
            m.take_routing_trace().into_iter().map(|r| (r.layer, r.pos, r.experts)).collect();
        let times = m.timing_snapshot().unwrap();
        assert_eq!(times.len(), layers);
        assert!(times.iter().all(|t| t.total() > 0.0), "every layer timed: {times:?}");
        runs.push((logits, trace, m.prefetch_accuracy()));
    }
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(a.1, b.1, "the same routing, under the same layer numbers");
    assert!(a.1.iter().any(|r| r.0 == layers - 1));
    // Prefetch guesses stay inside a stage (none across a hand-off), so the split makes fewer.
    assert!(b.2.1 > 0 && b.2.1 <= a.2.1, "{:?} vs {:?}", a.2, b.2);
    let max = a.0.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a.0.iter().zip(&b.0).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * max, "split logits differ by {diff} (max |logit| {max})");
}

#[test]
fn a_cloned_state_continues_on_every_stage() {
    let m = Model::load_on_split(&tiny(), &LoadOptions::default(), vec![CpuBackend, CpuBackend]).unwrap();
    let mut s = m.new_state();
    m.forward(&[3, 4, 5, 6], &mut s, LogitsFor::None).unwrap();
    let mut copy = s.clone();
    let a = m.forward(&[7, 8], &mut s, LogitsFor::All).unwrap();
    let b = m.forward(&[7, 8], &mut copy, LogitsFor::All).unwrap();
    assert_eq!(a, b);
    let mut fresh = m.new_state();
    let c = m.forward(&[3, 4, 5, 6, 7, 8], &mut fresh, LogitsFor::All).unwrap();
    let max = c.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tail = &c[c.len() - a.len()..];
    let diff = a.iter().zip(tail).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * max, "{diff}");
}

#[test]
fn a_split_that_cannot_be_made_is_a_clear_error() {
    let layers = flashmoe::ModelConfig::load(&tiny()).unwrap().num_layers;
    let too_many = vec![CpuBackend; layers + 1];
    let e = Model::load_on_split(&tiny(), &LoadOptions::default(), too_many).err().expect("more backends than layers");
    assert!(e.to_string().contains("at least one layer"), "{e}");
    // A state of the model on one backend is refused by the split one, and the other way.
    let one = Model::load_on(&tiny(), &LoadOptions::default(), CpuBackend).unwrap();
    let two = Model::load_on_split(&tiny(), &LoadOptions::default(), vec![CpuBackend, CpuBackend]).unwrap();
    let mut s = one.new_state();
    let e = two.forward(&[1], &mut s, LogitsFor::Last).expect_err("another placement's state");
    assert!(e.to_string().contains("another placement"), "{e}");
}
