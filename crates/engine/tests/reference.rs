//! The engine against transformers: logits of tiny random Qwen3.5-MoE / Qwen3-Next checkpoints
//! (made and evaluated by scripts/make_model_fixtures.py with transformers on CPU, f32) must match
//! in the batched-prefill path, the cached-decode path, and greedy continuations. The same test
//! body runs on every backend available: the CPU always, and with the `cuda` feature each model
//! also on the GPU (twice: every expert cached on the GPU with prefill through cuBLAS, and a
//! cache of k+1 experts, so that nearly every step evicts and copies, with prefill in 4-token
//! passes through the multi-token GEMV kernel).

mod checking;

use flashmoe::qwen35::{ModelWeights, SourceFormat};
use flashmoe::{LoadOptions, LogitsFor, Model};
use serde_json::Value;
use std::path::PathBuf;

fn models_dir() -> PathBuf {
    // FLASHMOE_TESTDATA lets a test binary built here run on another machine (the GPU one).
    match std::env::var_os("FLASHMOE_TESTDATA") {
        Some(d) => PathBuf::from(d).join("models"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models"),
    }
}

/// How to load a model on one backend.
type Loader = Box<dyn Fn(&std::path::Path, LoadOptions) -> Model>;

/// How far decode and prefill logits of one backend may differ (fraction of max|logit|) when
/// everything is f32.
const AGREE_F32: f32 = 2e-5;
/// Tolerance of a backend whose prefill products run on tensor cores (split bf16 / TF32
/// operands: the dense products keep 16 mantissa bits of each operand), against transformers and
/// between its own decode and prefill: 1e-3 of max|logit|, the bound the project allows tensor
/// cores (measured: ≤ 3.1e-4 on these fixtures); greedy continuations must still match exactly.
const TENSOR_TOL: f32 = 1e-3;

/// The backends this build and machine offer, as (name, loader, whether prefill runs on tensor
/// cores).
fn backends() -> Vec<(&'static str, Loader, bool)> {
    let plain = |o: LoadOptions| -> Loader {
        Box::new(move |dir, base| Model::load_with(dir, &merge(&o, base, dir)).expect("model"))
    };
    #[allow(unused_mut)]
    let mut v: Vec<(&'static str, Loader, bool)> = vec![
        ("cpu", plain(LoadOptions::default()), false),
        // A third backend from outside the engine: the CPU ops, every activation checked.
        (
            "checking",
            Box::new(|dir, base| Model::load_on(dir, &base, checking::CheckingBackend::default()).expect("model")),
            false,
        ),
        // Split by layers over three CPU backends (each its own state; the residual stream
        // handed from one to the next), as `--device cuda:0,1` splits over GPUs.
        (
            "cpu-split-3",
            Box::new(|dir, base| {
                use flashmoe::backend::cpu::CpuBackend;
                Model::load_on_split(dir, &base, vec![CpuBackend, CpuBackend, CpuBackend]).expect("model")
            }),
            false,
        ),
    ];
    #[cfg(feature = "cuda")]
    {
        use flashmoe::backend::{DeviceChoice, DeviceOptions, GpuCache, GpuTuning, Hybrid};
        match flashmoe::cuda::CudaDevice::open(0) {
            Ok(_) => {
                // Prefill through cuBLAS (from 2 tokens on), every expert cached: on tensor
                // cores (the default), and all in f32.
                let gpu = GpuTuning { blas_min_tokens: 2, ..Default::default() };
                let device = DeviceOptions { device: DeviceChoice::Cuda(0), gpu, ..Default::default() };
                v.push(("cuda", plain(LoadOptions { device, ..Default::default() }), true));
                let gpu = GpuTuning { precision: flashmoe::backend::Precision::F32, ..gpu };
                let device = DeviceOptions { device: DeviceChoice::Cuda(0), gpu, ..Default::default() };
                v.push(("cuda-f32", plain(LoadOptions { device, ..Default::default() }), false));
                // A cache of k+1 experts (nearly every step evicts and copies), prefill in
                // 4-token passes through the multi-token GEMV kernel.
                let gpu = GpuTuning { prefill_chunk: 4, ..Default::default() };
                let cache = GpuCache::Experts(usize::MAX); // replaced by k+1 in `merge`
                let device = DeviceOptions { device: DeviceChoice::Cuda(0), gpu_cache: cache, gpu };
                v.push(("cuda-small-cache", plain(LoadOptions { device: device.clone(), ..Default::default() }), true));
                // Hybrid decode: every miss computed by the CPU; then misses split between the
                // CPU (RAM-tier hits) and copies to the GPU (disk reads).
                // Exclusive tiers with every miss copied: experts move RAM → GPU and evicted ones
                // are copied back GPU → RAM (and later up again); and the inclusive tiers.
                // Hybrid auto's PCIe share forced: every RAM-tier miss copied from pinned RAM
                // to transit memory and computed on the GPU, and half of them.
                use flashmoe::backend::PcieShare;
                let auto = PcieShare::Auto;
                for (name, hybrid, ram, exclusive, share) in [
                    ("cuda-hybrid-cpu", Hybrid::Cpu, 0, true, auto),
                    ("cuda-hybrid-auto", Hybrid::Auto, 64 << 20, true, auto),
                    ("cuda-hybrid-pcie", Hybrid::Auto, 64 << 20, true, PcieShare::Fixed(1.0)),
                    ("cuda-hybrid-mixed", Hybrid::Auto, 64 << 20, true, PcieShare::Fixed(0.5)),
                    ("cuda-exclusive", Hybrid::Off, 64 << 20, true, auto),
                    ("cuda-inclusive", Hybrid::Off, 64 << 20, false, auto),
                ] {
                    let gpu = GpuTuning { hybrid, exclusive, pcie_share: share, ..device.gpu };
                    let device = DeviceOptions { gpu, ..device.clone() };
                    let store = flashmoe::experts::StoreOptions { ram_cache_bytes: ram, ..Default::default() };
                    v.push((name, plain(LoadOptions { device, store, ..Default::default() }), true));
                }
                // Split by layers over two GPUs (over GPU 0 twice on a one-GPU machine): every
                // expert cached; then k+1 experts per GPU with exclusive tiers (evictions copied
                // back to the RAM tier under the model's layer numbers, not the GPU's).
                let two = if flashmoe::cuda::device_count().unwrap_or(1) > 1 { [0, 1] } else { [0, 0] };
                let split = DeviceChoice::CudaSplit(flashmoe::backend::GpuList::new(&two).unwrap());
                let gpu = GpuTuning { blas_min_tokens: 2, ..Default::default() };
                let device = DeviceOptions { device: split, gpu, ..Default::default() };
                v.push(("cuda-split", plain(LoadOptions { device: device.clone(), ..Default::default() }), true));
                // The same through pinned host memory instead of a peer copy.
                let host = GpuTuning { peer_hand_off: false, ..gpu };
                let device = DeviceOptions { gpu: host, ..device };
                v.push(("cuda-split-host", plain(LoadOptions { device, ..Default::default() }), true));
                let gpu = GpuTuning { prefill_chunk: 4, exclusive: true, ..Default::default() };
                let device = DeviceOptions { device: split, gpu_cache: GpuCache::Experts(usize::MAX), gpu };
                let store = flashmoe::experts::StoreOptions { ram_cache_bytes: 64 << 20, ..Default::default() };
                v.push(("cuda-split-exclusive", plain(LoadOptions { device, store, ..Default::default() }), true));
            }
            Err(e) => eprintln!("no GPU backend: {e}"),
        }
    }
    v
}

/// The backend's options with the test's own (expert streaming) on top. A GPU cache of
/// `usize::MAX` experts means k+1 of the model at `dir`.
fn merge(backend: &LoadOptions, test: LoadOptions, dir: &std::path::Path) -> LoadOptions {
    let mut device = backend.device.clone();
    if device.gpu_cache == flashmoe::GpuCache::Experts(usize::MAX) {
        let k = if flashmoe::gguf::is_gguf(dir) {
            flashmoe::gguf::GgufModel::open(dir).expect("GGUF").config.experts_per_token
        } else {
            flashmoe::ModelConfig::load(dir).expect("config").experts_per_token
        };
        device.gpu_cache = flashmoe::GpuCache::Experts(k + 1);
    }
    // A backend that sets a RAM tier keeps it (the hybrid runs need one).
    let store = if backend.store.ram_cache_bytes > 0 { backend.store.clone() } else { test.store.clone() };
    LoadOptions { device, store, ..test }
}

struct Reference {
    prompt: Vec<u32>,
    logits: Vec<Vec<f32>>,
    prefill_len: usize,
    decode_logits: Vec<Vec<f32>>,
    greedy_prompt: Vec<u32>,
    greedy_tokens: Vec<u32>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

fn reference(name: &str) -> Reference {
    let path = models_dir().join(name).join("reference.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    Reference {
        prompt: ids(&v["prompt_ids"]),
        logits: rows(&v["logits"]),
        prefill_len: v["decode"]["prefill_len"].as_u64().unwrap() as usize,
        decode_logits: rows(&v["decode"]["logits"]),
        greedy_prompt: ids(&v["greedy"]["prompt_ids"]),
        greedy_tokens: ids(&v["greedy"]["tokens"]),
    }
}

/// max |a − b| / max |b| over all rows.
fn rel_err(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len());
    let mut max_d = 0.0f32;
    let mut max_v = 0.0f32;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            max_d = max_d.max((a - b).abs());
            max_v = max_v.max(b.abs());
        }
    }
    max_d / max_v
}

fn split(flat: Vec<f32>, v: usize) -> Vec<Vec<f32>> {
    flat.chunks(v).map(<[f32]>::to_vec).collect()
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn check_model(name: &str, tol: f32) {
    check_source(&models_dir().join(name), name, tol);
}

/// The model at `path` (a folder or a GGUF file) against the transformers reference of the
/// fixture folder `reference_name`, on every backend.
fn check_source(path: &std::path::Path, reference_name: &str, tol: f32) {
    let mut failed = Vec::new();
    for (backend, load, tensor_cores) in backends() {
        eprintln!("{}: backend {backend}", path.display());
        let (tol, agree) = if tensor_cores { (tol.max(TENSOR_TOL), TENSOR_TOL) } else { (tol, AGREE_F32) };
        // Every backend runs; the failures are listed together at the end.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_model_on(path, reference_name, tol, agree, &*load)
        }));
        if run.is_err() {
            failed.push(backend);
        }
    }
    assert!(failed.is_empty(), "{}: failed on backends {failed:?}", path.display());
}

fn check_model_on(
    path: &std::path::Path,
    reference_name: &str,
    tol: f32,
    agree: f32,
    load: &dyn Fn(&std::path::Path, LoadOptions) -> Model,
) {
    let name = path.file_name().unwrap().to_str().unwrap();
    // By default the experts are read in place from the checkpoint files through the expert
    // store; mapped access must give the very same logits.
    let model = load(path, LoadOptions::default());
    assert!(model.expert_store().is_some(), "{name}: experts should stream");
    let m2 = load(path, LoadOptions { stream_experts: false, ..Default::default() });
    let ids = reference(reference_name).prompt;
    let (mut s1, mut s2) = (model.new_state(), m2.new_state());
    let (streamed, mapped) =
        (model.forward(&ids, &mut s1, LogitsFor::All).unwrap(), m2.forward(&ids, &mut s2, LogitsFor::All).unwrap());
    // Hybrid decode may send streamed experts over PCIe to the GPU (mapped ones, not in pinned
    // memory, stay on the CPU): the same expert computed on another device, so within `agree`.
    if model.tier().is_some_and(|t| t.counters.pcie_experts > 0) {
        let v = model.config.vocab_size;
        let e = rel_err(&split(streamed, v), &split(mapped, v));
        assert!(e <= agree, "{name}: streamed (part over PCIe) and mapped experts differ by {e:.3e}");
    } else {
        assert_eq!(streamed, mapped, "{name}: streamed and mapped experts differ");
    }
    let io = model.expert_store().unwrap().snapshot();
    assert!(io.disk_reads > 0 && io.disk_bytes > 0, "{io:?}");
    let r = reference(reference_name);
    let v = model.config.vocab_size;

    // 1. One batched prefill over the whole prompt.
    let mut st = model.new_state();
    let prefill = split(model.forward(&r.prompt, &mut st, LogitsFor::All).unwrap(), v);
    let e = rel_err(&prefill, &r.logits);
    eprintln!("{name}: prefill vs transformers: {e:.3e}");
    assert!(e <= tol, "{name}: prefill logits differ from transformers by {e:.3e} (tolerance {tol:.0e})");

    // 2. Every token through the decode path, one at a time.
    let mut st = model.new_state();
    let mut decode = Vec::new();
    for &id in &r.prompt {
        decode.push(model.forward(&[id], &mut st, LogitsFor::Last).unwrap());
    }
    let e = rel_err(&decode, &r.logits);
    eprintln!("{name}: decode vs transformers: {e:.3e}");
    assert!(e <= tol, "{name}: decode logits differ from transformers by {e:.3e}");
    let e = rel_err(&decode, &prefill);
    eprintln!("{name}: decode vs prefill: {e:.3e}");
    assert!(e <= agree, "{name}: decode and prefill disagree by {e:.3e} (tolerance {agree:.0e})");

    // 2b. A state cloned mid-sequence (the server's prefix cache) continues like the original.
    let mut st = model.new_state();
    model.forward(&r.prompt[..r.prefill_len], &mut st, LogitsFor::None).unwrap();
    let mut copy = st.clone();
    let a = model.forward(&r.prompt[r.prefill_len..], &mut st, LogitsFor::Last).unwrap();
    let b = model.forward(&r.prompt[r.prefill_len..], &mut copy, LogitsFor::Last).unwrap();
    assert_eq!(a, b, "{name}: a cloned state diverged");

    // 3. Partial prefill then cached decode, against transformers' own cached decode.
    let mut st = model.new_state();
    let mut mixed = split(model.forward(&r.prompt[..r.prefill_len], &mut st, LogitsFor::All).unwrap(), v);
    for &id in &r.prompt[r.prefill_len..] {
        mixed.push(model.forward(&[id], &mut st, LogitsFor::Last).unwrap());
    }
    let e = rel_err(&mixed, &r.decode_logits);
    eprintln!("{name}: prefill+decode vs transformers cached decode: {e:.3e}");
    assert!(e <= tol, "{name}: prefill+decode logits differ by {e:.3e}");

    // 4. Greedy continuation.
    let mut st = model.new_state();
    let mut logits = model.forward(&r.greedy_prompt, &mut st, LogitsFor::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..r.greedy_tokens.len() {
        let id = argmax(&logits);
        out.push(id);
        logits = model.forward(&[id], &mut st, LogitsFor::Last).unwrap();
    }
    assert_eq!(out, r.greedy_tokens, "{name}: greedy continuation differs from transformers");
}

#[test]
fn qwen35_moe_hf_nested_sharded_fused_experts() {
    check_model("qwen35-moe-tiny", 1e-4);
}

#[test]
fn qwen35_moe_hf_flat_per_expert() {
    check_model("qwen35-moe-tiny-flat", 1e-4);
}

#[test]
fn qwen3_next_hf_grouped_projections() {
    check_model("qwen3-next-tiny", 1e-4);
}

/// llama.cpp's GGUFs (its own converter, f32, scripts/fixtures/gguf_models.py) of the same
/// checkpoints: the converter's layout changes (1 + w norms, −exp(A_log), Qwen3.5's tiled value
/// heads, [Kc, C] conv kernels, stacked experts, per-layer kinds) are all undone or followed.
fn gguf_models_dir() -> PathBuf {
    models_dir().join("../gguf/models")
}

#[test]
fn qwen35_moe_gguf_f32_from_llama_cpp_converter() {
    check_source(&gguf_models_dir().join("qwen35moe-tiny-F32.gguf"), "qwen35-moe-tiny", 1e-4);
}

#[test]
fn qwen3_next_gguf_f32_from_llama_cpp_converter() {
    check_source(&gguf_models_dir().join("qwen3next-tiny-F32.gguf"), "qwen3-next-tiny", 1e-4);
}

#[test]
fn qwen35_moe_mlx_affine_4bit() {
    check_model("qwen35-moe-tiny-mlx4", 1e-3);
}

#[test]
fn mlx_checkpoint_is_detected_and_quantized() {
    let mapped = LoadOptions { stream_experts: false, ..Default::default() };
    let mlx = Model::load_with(&models_dir().join("qwen35-moe-tiny-mlx4"), &mapped).unwrap();
    let m = mlx.host_weights::<ModelWeights>().unwrap();
    assert_eq!(m.format, SourceFormat::Mlx);
    assert!(m.lm_head.is_quantized());
    assert!(m.layers[0].moe.experts.resident().unwrap()[0].gate.is_quantized());
    let hf_model = Model::load_with(&models_dir().join("qwen35-moe-tiny"), &mapped).unwrap();
    let hf = hf_model.host_weights::<ModelWeights>().unwrap();
    assert_eq!(hf.format, SourceFormat::HuggingFace);
    // 4-bit weights with bf16 scales are well under a third of the f32 bytes.
    assert!(m.expert_bytes() * 3 < hf.expert_bytes());
}

#[test]
fn fewer_experts_changes_logits_and_is_reported() {
    let mut m = Model::load(&models_dir().join("qwen35-moe-tiny")).unwrap();
    assert!(m.routing_is_exact());
    let r = reference("qwen35-moe-tiny");
    m.set_experts_per_token(1).unwrap();
    assert!(!m.routing_is_exact());
    let mut st = m.new_state();
    let got = split(m.forward(&r.prompt, &mut st, LogitsFor::All).unwrap(), m.config.vocab_size);
    assert!(rel_err(&got, &r.logits) > 1e-3);
    assert!(m.set_experts_per_token(0).is_err());
    assert!(m.set_experts_per_token(m.config.num_experts + 1).is_err());
}
