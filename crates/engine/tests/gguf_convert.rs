//! `convert FILE.gguf DST`: a packed model that keeps the GGUF's blocks as they are. It runs with
//! the same kernels on the same bytes as the file does in place, so on the CPU its logits must
//! be the file's bit for bit; its expert blobs must hold exactly the file's expert ranges;
//! `verify` passes; the tokenizer, chat template and sampling defaults come along; bad input is
//! one clear error and leaves nothing behind.

use flashmoe::convert::{ConvertOptions, Target};
use flashmoe::gguf::GgufModel;
use flashmoe::packed::{Manifest, TensorLayout};
use flashmoe::{Engine, LoadOptions, LogitsFor, Model};
use std::path::{Path, PathBuf};

fn testdata(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(rel)
}

fn convert(src: &Path, dst: &Path) -> flashmoe::Result<flashmoe::convert::ConvertReport> {
    flashmoe::convert::convert(src, dst, &ConvertOptions::default(), &())
}

/// Logits of `ids`: one batched prefill, then token by token through the caches.
fn logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut st = m.new_state();
    let mut out = m.forward(ids, &mut st, LogitsFor::All).unwrap();
    let mut st = m.new_state();
    for &id in ids {
        out.extend(m.forward(&[id], &mut st, LogitsFor::Last).unwrap());
    }
    out
}

const PROMPTS: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7, 8], &[200, 17, 99, 3], &[42]];

/// Converts `file`, then checks the packed model's logits against the file's on the CPU, bit for
/// bit, with experts mapped and streamed alike; and that `verify` passes.
fn converted_runs_like_the_file(file: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("packed");
    let rep = convert(file, &dst).unwrap();
    assert!(rep.rmse.is_empty(), "nothing is requantized");
    let man = Manifest::load(&dst).unwrap();
    assert_eq!((man.layout, man.version), (TensorLayout::Gguf, 2));
    let v = flashmoe::packed::verify::verify(&dst).unwrap();
    assert_eq!(v.experts, man.experts.iter().map(|e| e.num_experts).sum::<usize>());
    for stream_experts in [false, true] {
        let opts = LoadOptions { stream_experts, ..Default::default() };
        let gguf = Model::load_with(file, &opts).unwrap();
        let packed = Model::load_with(&dst, &opts).unwrap();
        assert_eq!(format!("{:?}", gguf.config.layer_kinds), format!("{:?}", packed.config.layer_kinds));
        for ids in PROMPTS {
            let (a, b) = (logits(&gguf, ids), logits(&packed, ids));
            assert!(a.iter().all(|x| x.is_finite()) && a.iter().any(|&x| x != a[0]), "{}", file.display());
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{} (experts streamed: {stream_experts}), prompt {ids:?}: logits differ", file.display());
        }
    }
    (tmp, dst)
}

#[test]
fn converted_q4_k_m_gguf_runs_bit_for_bit_like_the_file() {
    let file = testdata("gguf/models/qwen35moe-k256-Q4_K_M.gguf");
    let (_tmp, dst) = converted_runs_like_the_file(&file);
    // The same formats in the tree: Q4_K experts, some Q6_K down projections.
    let m = Model::load_with(&dst, &LoadOptions { stream_experts: false, ..Default::default() }).unwrap();
    let w = m.host_weights::<flashmoe::qwen35::ModelWeights>().unwrap();
    assert_eq!(w.layers[0].moe.experts.resident().unwrap()[0].gate.format_name(), "Q4_K");
    assert!(w.layers.iter().any(|l| l.moe.experts.resident().unwrap()[0].down.format_name() == "Q6_K"));
}

#[test]
fn converted_q8_0_and_qwen3_next_ggufs_run_bit_for_bit_like_the_files() {
    // Q8_0 blocks; then Qwen3-Next's grouped value heads and fused `ssm_ba` (F32).
    converted_runs_like_the_file(&testdata("gguf/models/qwen35moe-tiny-Q8_0.gguf"));
    converted_runs_like_the_file(&testdata("gguf/models/qwen3next-tiny-F32.gguf"));
}

/// `src` (a GGUF v3 file) as a split of two parts, `NAME-0000{1,2}-of-00002.gguf` in `dir`, as
/// llama.cpp's gguf-split writes them: the metadata and the first half of the tensors in part 1,
/// the rest in part 2, each part with `split.no`, `split.count` and `split.tensors.count`.
fn split_in_two(src: &Path, dir: &Path) -> [PathBuf; 2] {
    let bytes = std::fs::read(src).unwrap();
    let header = flashmoe::gguf::GgufFile::open(src).unwrap().header;
    assert_eq!(header.version, 3);
    let tensors = &header.tensors;
    // The metadata bytes end where the first tensor info (u64 name length, name) starts.
    let first = [&(tensors[0].name.len() as u64).to_le_bytes()[..], tensors[0].name.as_bytes()].concat();
    let kv_end = (24..bytes.len()).find(|&i| bytes[i..].starts_with(&first)).unwrap();
    let kv = |key: &str, v: u32| {
        [&(key.len() as u64).to_le_bytes()[..], key.as_bytes(), &4u32.to_le_bytes(), &v.to_le_bytes()].concat()
    };
    let half = tensors.len() / 2;
    let mut paths = Vec::new();
    for (no, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let own_metadata = if no == 0 { &bytes[24..kv_end] } else { &[][..] };
        let kv_count = if no == 0 { header.metadata.len() } else { 0 } + 3;
        let mut out = [&b"GGUF"[..], &3u32.to_le_bytes(), &(part.len() as u64).to_le_bytes()].concat();
        out.extend((kv_count as u64).to_le_bytes());
        out.extend(own_metadata);
        out.extend(kv("split.no", no as u32));
        out.extend(kv("split.count", 2));
        out.extend(kv("split.tensors.count", tensors.len() as u32));
        let align = |n: u64| n.div_ceil(header.alignment) * header.alignment;
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in part {
            out.extend((t.name.len() as u64).to_le_bytes());
            out.extend(t.name.as_bytes());
            out.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.ggml_type.id().to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.len);
        }
        let data_start = align(out.len() as u64);
        for (t, off) in part.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend(&bytes[t.start as usize..(t.start + t.len) as usize]);
        }
        let path = dir.join(format!("m-{:05}-of-00002.gguf", no + 1));
        std::fs::write(&path, out).unwrap();
        paths.push(path);
    }
    paths.try_into().unwrap()
}

#[test]
fn a_split_gguf_converts_from_any_part() {
    let tmp = tempfile::tempdir().unwrap();
    let [first, second] = split_in_two(&testdata("gguf/models/qwen35moe-tiny-Q8_0.gguf"), tmp.path());
    assert_eq!(GgufModel::open(&first).unwrap().parts.parts.len(), 2);
    converted_runs_like_the_file(&first);
    converted_runs_like_the_file(&second);
}

#[test]
fn expert_blobs_hold_the_gguf_expert_ranges_and_tensors_their_bytes() {
    let file = testdata("gguf/models/qwen35moe-k256-Q4_K_M.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("packed");
    convert(&file, &dst).unwrap();
    let man = Manifest::load(&dst).unwrap();
    let gguf = GgufModel::open(&file).unwrap();
    for (layer, expert) in [(0usize, 0usize), (2, 3)] {
        let ef = &man.experts[layer];
        let blob = std::fs::read(dst.join(&ef.file)).unwrap();
        let blob = &blob[expert * ef.stride as usize..][..ef.blob_bytes as usize];
        let ranges = gguf.tensors.experts[layer].ranges(expert as u64);
        let names = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"];
        assert_eq!(ranges.len(), 3);
        for (name, range) in names.iter().zip(ranges) {
            let c = ef.components.iter().find(|c| c.name == *name).unwrap();
            let stored = &blob[c.offset as usize..][..c.nbytes as usize];
            assert_eq!(stored, gguf.bytes(range).as_slice(), "layer {layer} expert {expert} {name}");
            assert!(["Q4_K", "Q6_K"].contains(&c.dtype.as_str()), "{}", c.dtype);
        }
    }
    // A non-expert tensor: its GGUF name, type, row-major shape and bytes.
    let t = gguf.tensors.layers[0].iter().find(|t| t.gguf_name == "blk.0.ffn_gate_shexp.weight").unwrap();
    let e = man.tensors.iter().find(|e| e.name == t.gguf_name).unwrap();
    assert_eq!(e.dtype, t.ggml_type.name());
    assert_eq!(e.shape, t.dims.iter().rev().map(|&d| d as usize).collect::<Vec<_>>());
    let weights = std::fs::read(dst.join(&man.weights_file)).unwrap();
    assert_eq!(&weights[e.offset as usize..][..e.nbytes as usize], gguf.bytes(t.location).as_slice());
    assert_eq!(e.offset % 4096, 0);
}

#[test]
fn tokenizer_template_and_sampling_come_along() {
    let file = testdata("gguf/models/qwen35moe-tiny-F32.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("packed");
    convert(&file, &dst).unwrap();
    for f in ["tokenizer.json", "chat_template.jinja", "tokenizer_config.json", "config.json"] {
        assert!(dst.join(f).is_file(), "{f}");
    }
    let (a, b) = (Engine::load(&file).unwrap(), Engine::load(&dst).unwrap());
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(testdata("models/tokenizer_check.json")).unwrap()).unwrap();
    for case in check["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap(), "{text:?}");
    }
    for case in check["chat"].as_array().unwrap() {
        let args = &case["args"];
        let thinking = args.get("enable_thinking").and_then(serde_json::Value::as_bool);
        let render = |e: &Engine| e.render_chat(&args["conversation"], args.get("tools"), thinking).unwrap();
        assert_eq!(render(&a), render(&b), "chat case {}", case["name"]);
    }
    assert_eq!(a.stop_ids, b.stop_ids);
    assert_eq!(format!("{:?}", a.default_sampling), format!("{:?}", b.default_sampling));
    assert_eq!(a.template.bos_token(), b.template.bos_token());
    assert_eq!(a.template.eos_token(), b.template.eos_token());
}

#[test]
fn bad_ggufs_are_one_error_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let good = testdata("gguf/models/qwen35moe-tiny-Q8_0.gguf");
    let bytes = std::fs::read(&good).unwrap();
    let truncated = tmp.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    for (src, want) in [
        (truncated, "truncated.gguf"),
        (testdata("gguf/unknown-type.gguf"), "unknown GGML type id 77"),
        (testdata("gguf/bad-magic.gguf"), "bad-magic.gguf"),
    ] {
        let dst = tmp.path().join("out");
        let e = convert(&src, &dst).unwrap_err().to_string();
        assert!(e.contains(want) && !e.contains('\n'), "{}: {e}", src.display());
        assert!(!dst.exists() && !tmp.path().join("out.partial").exists(), "{e}");
    }
    // Requantizing a GGUF is not what this does.
    let opts = ConvertOptions { expert: Target::Affine(4), ..Default::default() };
    let e = flashmoe::convert::convert(&good, &tmp.path().join("q"), &opts, &()).unwrap_err().to_string();
    assert!(e.contains("--expert-bits") && e.contains("as they are"), "{e}");
    // A converted GGUF is not a convert source either (its tensors are GGUF blocks).
    let packed = tmp.path().join("packed");
    convert(&good, &packed).unwrap();
    let e = convert(&packed, &tmp.path().join("again")).unwrap_err().to_string();
    assert!(e.contains("convert the GGUF file itself"), "{e}");
}

/// A GGUF-layout manifest with one tensor of `dtype`, `shape` and `nbytes`, at `version`.
fn manifest(version: u32, layout: &str, dtype: &str, shape: &[usize], nbytes: u64) -> String {
    serde_json::json!({
        "format": "flashmoe-packed", "version": version, "layout": layout, "config": {}, "source": "",
        "created_by": "", "weights_file": "weights.bin", "experts": [], "copied_files": [],
        "tensors": [{"name": "blk.0.attn_qkv.weight", "dtype": dtype, "shape": shape, "offset": 0, "nbytes": nbytes}],
    })
    .to_string()
}

#[test]
fn gguf_layout_manifests_are_checked() {
    let parse = |text: String| Manifest::parse(&text, Path::new("manifest.json")).map_err(|e| e.to_string());
    // 2 rows of 512 Q4_K values: 2 blocks of 144 bytes each.
    assert!(parse(manifest(2, "gguf", "Q4_K", &[2, 512], 576)).is_ok());
    let e = parse(manifest(2, "gguf", "Q4_K", &[2, 512], 575)).unwrap_err();
    assert!(e.contains("needs 576 bytes, manifest says 575"), "{e}");
    let e = parse(manifest(2, "gguf", "Q4_K", &[2, 500], 576)).unwrap_err();
    assert!(e.contains("not a whole number of 256-element blocks"), "{e}");
    let e = parse(manifest(2, "gguf", "Q9_K", &[2, 512], 576)).unwrap_err();
    assert!(e.contains("unknown GGML type `Q9_K`"), "{e}");
    let e = parse(manifest(2, "gguf", "F32", &[1 << 40, 1 << 40], 0)).unwrap_err();
    assert!(e.contains("more than 2^64"), "{e}");
    let e = parse(manifest(1, "gguf", "Q4_K", &[2, 512], 576)).unwrap_err();
    assert!(e.contains("needs format version 2"), "{e}");
    let e = parse(manifest(3, "gguf", "Q4_K", &[2, 512], 576)).unwrap_err();
    assert!(e.contains("version 3 is not supported"), "{e}");
    let e = parse(manifest(2, "ggml", "Q4_K", &[2, 512], 576)).unwrap_err();
    assert!(e.contains("malformed manifest") && e.contains("ggml"), "{e}");
    // Version 1 manifests (no layout) are canonical, as before.
    let v1 = manifest(1, "canonical", "F32", &[2, 4], 32);
    assert_eq!(parse(v1).unwrap().layout, TensorLayout::Canonical);
}
