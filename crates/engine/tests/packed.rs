//! The packed format: convert → run gives the same logits as the source (same bits), requantization
//! reports its error, `verify` catches a flipped byte, an interrupted convert leaves nothing that
//! looks complete, and damaged packed files give clear errors.

use flashmoe::Progress;
use flashmoe::convert::{ConvertOptions, Target, convert};
use flashmoe::packed::verify::verify;
use flashmoe::{LogitsFor, Model};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models").join(name)
}

const IDS: [u32; 9] = [1, 5, 77, 300, 12, 260, 3, 199, 42];

fn logits(dir: &Path) -> Vec<f32> {
    logits_of(&Model::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
}

fn logits_of(m: &Model) -> Vec<f32> {
    let mut st = m.new_state();
    let mut out = m.forward(&IDS[..5], &mut st, LogitsFor::All).unwrap();
    for &id in &IDS[5..] {
        out.extend(m.forward(&[id], &mut st, LogitsFor::Last).unwrap());
    }
    out
}

fn keep() -> ConvertOptions {
    ConvertOptions { expert: Target::Keep, other: Target::Keep, ..ConvertOptions::default() }
}

#[test]
fn keep_conversion_gives_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen35-moe-tiny", "qwen35-moe-tiny-flat", "qwen3-next-tiny", "qwen35-moe-tiny-mlx4"] {
        let dst = tmp.path().join(name);
        let rep = convert(&fixture(name), &dst, &keep(), &()).unwrap();
        assert!(rep.rmse.is_empty(), "{name}: nothing was requantized");
        let want = logits(&fixture(name));
        assert_eq!(want, logits(&dst), "{name}: packed logits differ from the source");
        // Streaming one expert buffer at a time, with a RAM cache, and mapped: all identical.
        let m = Model::load_with(
            &dst,
            &flashmoe::LoadOptions {
                store: flashmoe::experts::StoreOptions { ram_cache_bytes: 1 << 20, ..Default::default() },
                fetch_chunk: Some(1),
                prefetch: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(want, logits_of(&m), "{name}: chunked streaming with prefetch differs");
        assert_eq!(want, logits_of(&m), "{name}: second pass (RAM cache hits) differs");
        let io = m.expert_store().unwrap().snapshot();
        assert!(io.ram_hits > 0 && io.disk_reads > 0, "{io:?}");
        // Prefetch guessed during the decode steps; its accuracy is a fraction.
        let (h, t) = m.prefetch_accuracy();
        assert!(t > 0 && h <= t, "{h}/{t}");
        let mapped = flashmoe::LoadOptions { stream_experts: false, ..Default::default() };
        assert_eq!(want, logits_of(&Model::load_with(&dst, &mapped).unwrap()), "{name}: mapped packed differs");
        let v = verify(&dst).unwrap();
        let m = Model::load(&dst).unwrap();
        assert_eq!(v.experts, m.config.num_layers * m.config.num_experts);
        assert!(dst.join("tokenizer.json").exists() && dst.join("config.json").exists());
        // Every expert blob starts on a 4 KiB boundary: one expert is one aligned read.
        let man = flashmoe::packed::Manifest::load(&dst).unwrap();
        assert!(man.experts.iter().all(|e| e.stride % 4096 == 0));
        assert!(man.tensors.iter().all(|t| t.offset % 4096 == 0));
    }
    // The default options keep an MLX checkpoint's quantization as it is.
    let dst = tmp.path().join("mlx-default");
    convert(&fixture("qwen35-moe-tiny-mlx4"), &dst, &ConvertOptions::default(), &()).unwrap();
    assert_eq!(logits(&fixture("qwen35-moe-tiny-mlx4")), logits(&dst));
}

#[test]
fn requantization_reports_rmse_per_layer_and_projection() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("q2");
    let opts = ConvertOptions { expert: Target::Affine(2), group_size: 32, ..ConvertOptions::default() };
    let rep = convert(&fixture("qwen35-moe-tiny-mlx4"), &dst, &opts, &()).unwrap();
    let rows: Vec<_> = rep.rmse.iter().filter(|r| r.projection.starts_with("experts.")).collect();
    assert_eq!(rows.len(), 8 * 3, "one row per layer and projection");
    for r in &rows {
        assert_eq!((r.from.as_str(), r.to.as_str()), ("4-bit/g32", "2-bit/g32"));
        // 2-bit codes of values spread over 16 levels: error well above zero, below the signal.
        assert!(r.rmse > 0.1 * r.rms && r.rmse < 0.6 * r.rms, "{r:?}");
    }
    let man = flashmoe::packed::Manifest::load(&dst).unwrap();
    let gate = man.experts[0].components.iter().find(|c| c.name == "gate_proj.weight").unwrap();
    assert_eq!(gate.quant.as_ref().unwrap().bits, 2);
    // Smaller on disk than the 4-bit experts, and it runs.
    let src = flashmoe::packed::Manifest::load(&{
        let d = tmp.path().join("q4");
        convert(&fixture("qwen35-moe-tiny-mlx4"), &d, &keep(), &()).unwrap();
        d
    })
    .unwrap();
    assert!(man.experts[0].blob_bytes < src.experts[0].blob_bytes);
    assert_eq!(logits(&dst).len(), IDS.len() * 320);

    // Float source → 4-bit experts (group 32 so every expert matrix qualifies).
    let dst = tmp.path().join("f32-to-4");
    let opts = ConvertOptions { group_size: 32, ..ConvertOptions::default() };
    let rep = convert(&fixture("qwen35-moe-tiny"), &dst, &opts, &()).unwrap();
    let r = rep.rmse.iter().find(|r| r.projection == "experts.down_proj").unwrap();
    assert_eq!((r.from.as_str(), r.to.as_str()), ("f32", "4-bit/g32"));
    let r = rep.rmse.iter().find(|r| r.projection == "linear_attn.in_proj_qkv").unwrap();
    assert_eq!(r.to, "8-bit/g32");
    let mapped = flashmoe::LoadOptions { stream_experts: false, ..Default::default() };
    let m = Model::load_with(&dst, &mapped).unwrap();
    let w = m.host_weights::<flashmoe::qwen35::ModelWeights>().unwrap();
    assert!(w.layers[0].moe.experts.resident().unwrap()[0].down.is_quantized());
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

#[test]
fn verify_names_the_first_bad_expert_or_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("p");
    convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap();
    let man = flashmoe::packed::Manifest::load(&dst).unwrap();
    let ef = &man.experts[5];
    flip_byte(&dst.join(&ef.file), 3 * ef.stride as usize + 100);
    let e = verify(&dst).unwrap_err().to_string();
    assert!(e.contains("experts/layer_005.bin") && e.contains("expert 3 of layer 5"), "{e}");

    let dst = tmp.path().join("p2");
    convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap();
    let t = man.tensors.iter().find(|t| t.name == "model.layers.2.linear_attn.in_proj_z.weight").unwrap();
    flip_byte(&dst.join("weights.bin"), t.offset as usize + 7);
    let e = verify(&dst).unwrap_err().to_string();
    assert!(e.contains("weights.bin") && e.contains("model.layers.2.linear_attn.in_proj_z.weight"), "{e}");
}

/// Stops the conversion after a given number of source bytes, like an interrupted process.
struct StopAfter(u64, AtomicU64);

impl Progress for StopAfter {
    fn inc(&self, bytes: u64) -> bool {
        self.1.fetch_add(bytes, Ordering::SeqCst) + bytes < self.0
    }
}

#[test]
fn interrupted_convert_leaves_nothing_that_looks_complete_and_can_be_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    let e = convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &StopAfter(1_000_000, AtomicU64::new(0))).unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert!(!dst.exists(), "no destination after an interrupted convert");
    let partial = tmp.path().join("out.partial");
    assert!(partial.exists() && !partial.join("manifest.json").exists());
    assert!(Model::load(&partial).is_err());
    convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap();
    assert!(!partial.exists());
    verify(&dst).unwrap();
    // An existing destination is kept unless forced.
    let e = convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    let force = ConvertOptions { force: true, ..keep() };
    convert(&fixture("qwen3-next-tiny"), &dst, &force, &()).unwrap();
    assert_eq!(Model::load(&dst).unwrap().config.family, flashmoe::config::Family::Qwen3Next);
}

#[test]
fn damaged_packed_models_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("p");
    convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap();
    let load_err = |d: &Path| match Model::load(d) {
        Ok(_) => panic!("loaded a damaged model"),
        Err(e) => e.to_string(),
    };

    // A truncated expert file.
    let f = dst.join("experts/layer_002.bin");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 4096).unwrap();
    let e = load_err(&dst);
    assert!(e.contains("experts/layer_002.bin") && e.contains("truncated or mismatched"), "{e}");
    assert!(verify(&dst).unwrap_err().to_string().contains("layer_002.bin"));

    // A truncated weights file.
    let dst = tmp.path().join("p2");
    convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap();
    let f = dst.join("weights.bin");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let e = load_err(&dst);
    assert!(e.contains("weights.bin") && e.contains("truncated"), "{e}");

    // A manifest from another format version, and a malformed one.
    let dst = tmp.path().join("p3");
    convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap();
    let mpath = dst.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(&mpath, text.replacen("\"version\":1", "\"version\":99", 1)).unwrap();
    let e = load_err(&dst);
    assert!(e.contains("manifest.json") && e.contains("version 99"), "{e}");
    std::fs::write(&mpath, &text[..text.len() / 2]).unwrap();
    let e = load_err(&dst);
    assert!(e.contains("manifest.json: malformed manifest"), "{e}");

    // A packed model whose config does not match its files (fewer experts than the config says).
    let dst = tmp.path().join("p4");
    convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap();
    let cpath = dst.join("config.json");
    let cfg = std::fs::read_to_string(&cpath).unwrap().replace("\"num_experts\": 8", "\"num_experts\": 16");
    std::fs::write(&cpath, cfg).unwrap();
    let e = load_err(&dst);
    assert!(e.contains("layer_000.bin: holds 8 experts but config.json says 16"), "{e}");
    // Mapped (not streamed), the same mismatch is caught at the missing tensor.
    let mapped = flashmoe::LoadOptions { stream_experts: false, ..Default::default() };
    let e = Model::load_with(&dst, &mapped).err().unwrap().to_string();
    assert!(e.contains("experts.8.gate_proj.weight") && e.contains("not found"), "{e}");
}

#[test]
fn a_second_writer_of_the_same_destination_stops_instead_of_deleting_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    let first = flashmoe::convert::start_output(&dst).unwrap();
    std::fs::write(first.join("weights.bin"), b"in progress").unwrap();
    let err = flashmoe::convert::start_output(&dst).err().expect("refused").to_string();
    assert!(err.contains("another flashmoe process is writing"), "{err}");
    let err = convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap_err().to_string();
    assert!(err.contains("another flashmoe process is writing"), "{err}");
    assert_eq!(std::fs::read(first.join("weights.bin")).unwrap(), b"in progress");
    // Once the writer is gone its leftover is an interrupted run: removed, and the convert runs.
    drop(first);
    convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap();
    verify(&dst).unwrap();
    assert!(!dst.join(".lock").exists(), "the lock file is not part of the model");
}

#[test]
fn a_damaged_expert_is_an_error_on_its_first_read_unless_told_not_to_check() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    convert(&fixture("qwen35-moe-tiny"), &dst, &keep(), &()).unwrap();
    let reference = logits(&dst);
    // Flip one byte inside every expert blob of layer 0 (whichever the router picks is damaged).
    let man = flashmoe::packed::Manifest::load(&dst).unwrap();
    let ef = &man.experts[0];
    let path = dst.join(&ef.file);
    let mut bytes = std::fs::read(&path).unwrap();
    for e in 0..ef.num_experts {
        bytes[e * ef.stride as usize + 100] ^= 0x40;
    }
    std::fs::write(&path, &bytes).unwrap();
    let m = Model::load(&dst).unwrap();
    let mut st = m.new_state();
    let err = m.forward(&IDS[..3], &mut st, LogitsFor::Last).unwrap_err().to_string();
    assert!(err.contains("of layer 0") && err.contains("fails its checksum"), "{err}");
    // Unchecked, the damaged bytes are computed on (different logits, no error).
    let opts = flashmoe::LoadOptions {
        store: flashmoe::experts::StoreOptions { verify: false, ..Default::default() },
        ..Default::default()
    };
    let unchecked = logits_of(&Model::load_with(&dst, &opts).unwrap());
    assert_ne!(unchecked, reference);
}

/// Records what `convert` reports.
#[derive(Default)]
struct Recorder {
    starts: std::sync::Mutex<Vec<(u64, String)>>,
    done: AtomicU64,
    messages: std::sync::Mutex<Vec<String>>,
    finished: AtomicU64,
}

impl Progress for Recorder {
    fn start(&self, total: u64, label: &str) {
        self.starts.lock().unwrap().push((total, label.to_string()));
    }
    fn inc(&self, n: u64) -> bool {
        self.done.fetch_add(n, Ordering::SeqCst);
        true
    }
    fn message(&self, msg: &str) {
        self.messages.lock().unwrap().push(msg.to_string());
    }
    fn finish(&self) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// Sum of the tensor bytes a safetensors folder holds (its headers' data offsets).
fn safetensors_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            total += st.tensors().iter().map(|(_, t)| t.data().len() as u64).sum::<u64>();
        }
    }
    total
}

#[test]
fn convert_reports_every_layer_and_every_byte_it_announced() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen35-moe-tiny", "qwen3-next-tiny"] {
        let src = fixture(name);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        // Qwen3.5 nests the text model's settings in `text_config`.
        let text = config.get("text_config").unwrap_or(&config);
        let layers = text["num_hidden_layers"].as_u64().unwrap();
        let rec = Recorder::default();
        convert(&src, &tmp.path().join(name), &ConvertOptions::default(), &rec).unwrap();
        let starts = rec.starts.lock().unwrap().clone();
        assert_eq!(starts.len(), 1, "{name}: one phase");
        let (total, label) = &starts[0];
        assert_eq!(label, "convert");
        // The bar ends full: the bytes reported add up to the total announced, which is the
        // source's matrices (the checkpoint's tensors less its norm and gate vectors).
        assert_eq!(rec.done.load(Ordering::SeqCst), *total, "{name}");
        let source = safetensors_bytes(&src);
        assert!(*total <= source && *total as f64 > 0.9 * source as f64, "{name}: {total} of {source}");
        let want: Vec<String> = (1..=layers).map(|i| format!("layer {i}/{layers}")).collect();
        assert_eq!(*rec.messages.lock().unwrap(), want, "{name}");
        assert_eq!(rec.finished.load(Ordering::SeqCst), 1, "{name}");
    }
}
