//! GGUF reader against files written by the outside reference, gguf-py's GGUFWriter
//! (scripts/fixtures/gguf_files.py), and what gguf-py's GGUFReader reads back from them
//! (testdata/gguf/expected.json): metadata values, tensor dims/types/byte ranges, each expert's
//! bytes; hostile files (each a clear error, never a panic); the tokenizer built from a GGUF
//! vocabulary against the real Qwen3.5 tokenizer.json.

use flashmoe::config::{Family, LayerKind};
use flashmoe::gguf::{Array, GgufModel, GgufParts, Header, LayerExperts, Layout, Value};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

mod python_scripts;
use python_scripts::run_python;

fn testdata(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(rel)
}

fn expected() -> Json {
    serde_json::from_str(&std::fs::read_to_string(testdata("gguf/expected.json")).unwrap()).unwrap()
}

/// A GGUF metadata value equals what GGUFReader decoded.
fn same_value(ours: &Value, theirs: &Json) -> bool {
    match (ours, theirs) {
        (Value::String(s), Json::String(t)) => s == t,
        (Value::Bool(b), Json::Bool(t)) => b == t,
        (Value::F32(_) | Value::F64(_), Json::Number(n)) => ours.as_f64() == n.as_f64(),
        (Value::Array(a), Json::Array(items)) => match a {
            Array::String(v) => v.iter().zip(items).all(|(s, t)| t.as_str() == Some(s)) && v.len() == items.len(),
            Array::F32(v) => v.iter().zip(items).all(|(x, t)| t.as_f64() == Some(*x as f64)) && v.len() == items.len(),
            _ => a.ints().is_some_and(|v| {
                v.len() == items.len()
                    && v.iter()
                        .zip(items)
                        .all(|(x, t)| t.as_i64().map(i128::from).or(t.as_u64().map(i128::from)) == Some(*x))
            }),
        },
        (_, Json::Number(n)) => {
            ours.as_int().is_some_and(|i| n.as_i64().map(i128::from).or(n.as_u64().map(i128::from)) == Some(i))
        }
        _ => false,
    }
}

/// Every metadata key and tensor of a parsed file equals GGUFReader's reading of it.
fn check_file(h: &Header, want: &Json) {
    assert_eq!(h.data_start, want["data_start"].as_u64().unwrap());
    assert_eq!(h.file_len, want["size"].as_u64().unwrap());
    let meta = want["metadata"].as_object().unwrap();
    assert_eq!(h.metadata.len(), meta.len(), "metadata count");
    for (k, v) in meta {
        let ours = h.get(k).unwrap_or_else(|| panic!("key {k} missing"));
        if v.is_null() {
            continue; // nested arrays: GGUFReader leaves them undecoded; checked by hand below
        }
        assert!(same_value(ours, v), "{k}: ours {ours:?}, gguf-py {v}");
    }
    let tensors = want["tensors"].as_array().unwrap();
    assert_eq!(h.tensors.len(), tensors.len());
    for (t, w) in h.tensors.iter().zip(tensors) {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        assert_eq!(t.ggml_type.id() as u64, w["type"].as_u64().unwrap(), "{}", t.name);
        let dims: Vec<u64> = w["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!((t.start, t.end()), (w["start"].as_u64().unwrap(), w["end"].as_u64().unwrap()), "{}", t.name);
    }
}

#[test]
fn every_value_type_matches_gguf_py() {
    let path = testdata("gguf/small.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let h = Header::parse(&bytes, &path).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    check_file(&h, &expected()["small"]["files"][0]);
    // The nested array the script wrote: [[1, 2], [3]].
    let Some(Value::Array(Array::Array(inner))) = h.get("test.array_nested") else { panic!("nested array") };
    let got: Vec<Vec<i128>> = inner.iter().map(|a| a.ints().unwrap()).collect();
    assert_eq!(got, vec![vec![1, 2], vec![3]]);
    assert_eq!(h.get("test.u64"), Some(&Value::U64((1 << 63) + 5)));
    assert_eq!(h.get("test.string").and_then(Value::as_str), Some("héllo GGUF"));
}

#[test]
fn tiny_qwen35moe_config_tensors_and_expert_ranges() {
    let path = testdata("gguf/qwen35moe-tiny.gguf");
    let m = GgufModel::open(&path).unwrap();
    let want = &expected()["qwen35moe"];
    check_file(&m.parts.parts[0].header, &want["files"][0]);
    assert_eq!(m.parts.parts[0].header.alignment, 64);
    let c = &want["config"];
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let cfg = &m.config;
    assert_eq!(cfg.family, Family::Qwen35Moe);
    assert_eq!(m.facts.architecture, "qwen35moe");
    assert_eq!(m.facts.name.as_deref(), Some("Qwen3.5 tiny test"));
    assert_eq!(m.facts.file_type, Some(15)); // MOSTLY_Q4_K_M
    assert_eq!(m.facts.mtp_layers, n("MTP"));
    assert_eq!(
        (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
        (n("H"), n("L"), n("nh"), n("nkv"), n("D"))
    );
    assert_eq!(
        (cfg.linear_key_heads, cfg.linear_value_heads, cfg.linear_key_dim, cfg.linear_value_dim, cfg.conv_kernel),
        (n("Hk"), n("Hv"), n("Dk"), n("Dv"), n("Kc"))
    );
    assert_eq!(
        (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate, cfg.shared_intermediate, cfg.vocab_size),
        (n("E"), n("k"), n("I"), n("Is"), n("V"))
    );
    assert_eq!(cfg.rope_theta, 1e7);
    assert_eq!(cfg.rotary_dims(), n("D") / 4);
    assert_eq!(cfg.rms_norm_eps, 1e-6);
    assert_eq!(cfg.max_position_embeddings, 262_144);
    assert!(!cfg.tie_word_embeddings);
    let full: Vec<usize> = (0..cfg.num_layers).filter(|&i| cfg.layer_kinds[i] == LayerKind::FullAttention).collect();
    assert_eq!(full, vec![3]);

    // Names and layout facts.
    let find = |name: &str| m.tensors.layers.iter().flatten().find(|t| t.gguf_name == name).unwrap();
    let qkv = find("blk.0.attn_qkv.weight");
    assert_eq!(qkv.hf_name, "model.layers.0.linear_attn.in_proj_qkv.weight");
    let key_dim = (n("Hk") * n("Dk")) as u64;
    assert_eq!(
        qkv.layout,
        vec![Layout::ValueHeadsTiled {
            axis: flashmoe::gguf::tensors::Axis::Rows,
            skip: 2 * key_dim,
            head_width: n("Dv") as u64
        }]
    );
    assert!(find("blk.1.ssm_a").layout.contains(&Layout::NegExpALog));
    assert!(find("blk.3.attn_q_norm.weight").layout.contains(&Layout::NormPlusOne));
    assert!(find("blk.2.ssm_norm.weight").layout.is_empty(), "the gated norm is stored as is");
    assert_eq!(find("blk.3.ffn_gate_exps.weight").hf_name, "model.layers.3.mlp.switch_mlp.gate_proj.weight");
    assert_eq!(m.tensors.mtp.len(), 4);
    assert!(m.tensors.mtp.iter().any(|t| t.hf_name == "mtp.fc.weight"));

    // Expert e's range holds exactly the bytes numpy gives for data[e] of the stacked tensor.
    let tensors = want["files"][0]["tensors"].as_array().unwrap();
    for (layer, experts) in m.tensors.experts.iter().enumerate() {
        let LayerExperts::Separate { gate, up, down } = experts else { panic!("separate experts") };
        for slice in [gate, up, down] {
            let w = tensors.iter().find(|t| t["name"] == slice.tensor.as_str()).unwrap();
            assert!(slice.tensor.starts_with(&format!("blk.{layer}.")));
            for (e, ref_e) in w["experts"].as_array().unwrap().iter().enumerate() {
                let bytes = m.bytes(slice.range(e as u64));
                let b = bytes.as_slice();
                let sum: u64 = b.iter().map(|&x| x as u64).sum();
                assert_eq!(sum, ref_e["sum"].as_u64().unwrap(), "{} expert {e}", slice.tensor);
                let head: String = b[..8].iter().map(|x| format!("{x:02x}")).collect();
                assert_eq!(head, ref_e["head"].as_str().unwrap(), "{} expert {e}", slice.tensor);
            }
        }
        // Q4_K gate/up (18,432 B) + Q8_0 down (8,704 B) per expert: 256·32/256·144 and 32/32·34·256.
        assert_eq!(experts.bytes_per_expert(), 2 * 32 * 144 + 256 * 34);
    }
}

#[test]
fn split_model_opens_from_any_part() {
    let want = &expected()["qwen3next"];
    for given in ["qwen3next-tiny-00001-of-00002.gguf", "qwen3next-tiny-00002-of-00002.gguf"] {
        let m = GgufModel::open(&testdata(&format!("gguf/{given}"))).unwrap();
        assert_eq!(m.parts.parts.len(), 2);
        for (p, w) in m.parts.parts.iter().zip(want["files"].as_array().unwrap()) {
            assert!(p.path.ends_with(w["file"].as_str().unwrap()));
            check_file(&p.header, w);
        }
        assert_eq!(m.parts.tensor_count(), 71);
        assert_eq!(m.config.family, Family::Qwen3Next);
        assert_eq!(m.config.num_layers, 4);
        assert_eq!(m.config.rms_norm_eps, 1e-5);
        let full: Vec<usize> = (0..4).filter(|&i| m.config.layer_kinds[i] == LayerKind::FullAttention).collect();
        assert_eq!(full, vec![1, 3]);
        // Qwen3-Next keeps HF's grouped value heads: no tiling fact on its tensors.
        let qkv = m.tensors.layers[0].iter().find(|t| t.gguf_name == "blk.0.attn_qkv.weight").unwrap();
        assert!(qkv.layout.is_empty());
        // Tensors of the second part are found there.
        let (part, t) = m.parts.tensor("blk.3.ffn_down_exps.weight").unwrap();
        let file = &want["files"][part];
        let w = file["tensors"].as_array().unwrap().iter().find(|x| x["name"] == t.name.as_str()).unwrap();
        assert_eq!(t.start, w["start"].as_u64().unwrap());
    }
}

#[test]
fn missing_split_part_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let only = dir.path().join("m-00001-of-00002.gguf");
    std::fs::copy(testdata("gguf/qwen3next-tiny-00001-of-00002.gguf"), &only).unwrap();
    let e = GgufParts::open(&only).unwrap_err().to_string();
    assert!(e.contains("m-00002-of-00002.gguf") && e.contains("split part 2 of 2 is missing"), "{e}");
    // A part under a non-split name cannot find its partners.
    let renamed = dir.path().join("model.gguf");
    std::fs::copy(testdata("gguf/qwen3next-tiny-00001-of-00002.gguf"), &renamed).unwrap();
    let e = GgufParts::open(&renamed).unwrap_err().to_string();
    assert!(e.contains("`split.count` is 2"), "{e}");
}

#[test]
fn hostile_files_give_one_line_errors() {
    let cases = [
        ("bad-magic", "not a GGUF file"),
        ("version-1", "GGUF version 1 is not supported"),
        ("big-endian", "big-endian GGUF"),
        ("unknown-type", "unknown GGML type id 77"),
        ("offset-past-eof", "lie outside the file"),
        ("misaligned-offset", "not a multiple of the alignment 32"),
        ("ndims-9", "n_dims 9"),
        ("string-2e60", "has length 1152921504606846976, more than the"),
        ("array-2e60", "count 1152921504606846976"),
        ("unknown-value-type", "unknown value type 99"),
        ("tensor-count-2e61", "tensor count 2305843009213693952"),
    ];
    let listed = expected()["hostile"].as_object().unwrap().len();
    assert_eq!(listed, cases.len(), "every hostile file the script writes is checked");
    for (name, want) in cases {
        let path = testdata(&format!("gguf/{name}.gguf"));
        let e = GgufParts::open(&path).unwrap_err().to_string();
        assert!(e.contains(want), "{name}: {e}");
        assert!(e.starts_with(&path.display().to_string()), "{name}: names the file: {e}");
        assert!(!e.contains('\n'), "{name}: one line: {e}");
    }
    let e = GgufModel::open(&testdata("gguf/small.gguf")).unwrap_err().to_string();
    assert!(e.contains("block_count"), "a file without model metadata: {e}");
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    for file in ["gguf/small.gguf", "gguf/qwen35moe-tiny.gguf"] {
        let path = testdata(file);
        let bytes = std::fs::read(&path).unwrap();
        let h = Header::parse(&bytes, &path).unwrap();
        let last = h.tensors.iter().map(|t| t.end()).max().unwrap() as usize;
        // Every byte of the header; then strided through the data, and the last bytes.
        let mut cuts: Vec<usize> = (0..h.data_start as usize + 64).collect();
        cuts.extend((h.data_start as usize..last).step_by(997));
        cuts.extend(last - 8..last);
        for n in cuts.into_iter().filter(|&n| n < last) {
            assert!(Header::parse(&bytes[..n], &path).is_err(), "{file} cut at {n} parsed");
        }
        // Padding after the last tensor is not needed.
        Header::parse(&bytes[..last], &path).unwrap();
    }
}

#[test]
fn corrupted_header_bytes_never_panic() {
    let path = testdata("gguf/small.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let h = Header::parse(&bytes, &path).unwrap();
    for i in 0..h.data_start as usize {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] = v;
            // Either parses (a changed value) or errors; never panics or allocates absurdly.
            let _ = Header::parse(&b, &path);
        }
    }
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    let mut bytes = std::fs::read(testdata("gguf/qwen35moe-tiny.gguf")).unwrap();
    // general.architecture is the writer's first key; "qwen35moe" → "llama35xx" keeps the length.
    let at = bytes.windows(9).position(|w| w == b"qwen35moe").unwrap();
    bytes[at..at + 9].copy_from_slice(b"llama35xx");
    std::fs::write(&path, &bytes).unwrap();
    let e = GgufModel::open(&path).unwrap_err().to_string();
    assert!(e.contains("GGUF architecture `llama35xx` is not supported (supported: qwen35moe, qwen3next)"), "{e}");
}

/// Writes `tokenizer_json` into a vocab-only GGUF with gguf-py, as llama.cpp's converter does.
fn vocab_gguf(dir: &Path, tokenizer_json: &str, config: Option<&str>) -> PathBuf {
    let out = dir.join("vocab.gguf");
    let mut args = vec!["--tokenizer".into(), out.clone(), "--tokenizer-json".into(), testdata(tokenizer_json)];
    if let Some(c) = config {
        args.extend(["--tokenizer-config".into(), testdata(c)]);
    }
    run_python(&testdata("../scripts/fixtures/gguf_files.py"), &args);
    out
}

const TEXTS: [&str; 11] = [
    "Hello, world! The history of the Roman Empire spans centuries.",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n  ",
    "日本語のテキストと中文文本，한국어 텍스트.",
    "Ünïcödé façade naïve café — “quotes” … ½ ∑ √ ∞",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
    "def f(a, b):\n\treturn a ** 2 + b // 3  # comment\n",
    "Numbers: 1234567890, 3.14159, -42, 1e-6, 0x1F",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>",
    "Emoji 👍🏽 and combining: e\u{301} a\u{308} नमस्ते مرحبا שלום Привет",
    "I'm, you're, they'll, we'd, it's, can't — CAN'T I'M",
    "                                                                 many spaces",
];

/// The real Qwen3.5 (pre `qwen35`) and Qwen3 (pre `qwen2`, non-special added tokens such as
/// `<think>`) tokenizers, written into GGUFs by gguf-py and read back by us, encode and decode
/// exactly like their tokenizer.json.
#[test]
fn tokenizer_from_gguf_vocab_matches_tokenizer_json() {
    for (json_gz, config, im_end) in [
        ("text/qwen3.5-tokenizer.json.gz", None, 248046),
        ("text/qwen3-tokenizer.json.gz", Some("text/qwen3-tokenizer_config.json"), 151645),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let parts = GgufParts::open(&vocab_gguf(dir.path(), json_gz, config)).unwrap();
        let ours = flashmoe::gguf::tokenizer_from_metadata(&parts).unwrap();
        let mut json = Vec::new();
        let gz = std::fs::File::open(testdata(json_gz)).unwrap();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut json).unwrap();
        let reference = flashmoe_text::TextTokenizer::from_bytes(&json).unwrap();
        for t in TEXTS {
            let a = ours.encode(t, false).unwrap();
            let b = reference.encode(t, false).unwrap();
            assert_eq!(a, b, "{json_gz}: ids differ for {t:?}");
            for skip in [false, true] {
                assert_eq!(ours.decode(&a, skip).unwrap(), reference.decode(&b, skip).unwrap(), "{json_gz}: {t:?}");
            }
        }
        assert_eq!(ours.token_to_id("<|im_end|>"), Some(im_end));
        assert!(ours.is_special(im_end));
        let template = parts.get("tokenizer.chat_template").and_then(Value::as_str).unwrap();
        match config {
            None => assert_eq!(template, "{{ messages[0]['content'] }}"),
            Some(c) => {
                let cfg: Json = serde_json::from_str(&std::fs::read_to_string(testdata(c)).unwrap()).unwrap();
                assert_eq!(template, cfg["chat_template"].as_str().unwrap());
            }
        }
    }
}

/// Absurd hyperparameters in a model's metadata are refused before anything is sized by them.
#[test]
fn absurd_metadata_counts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read(testdata("gguf/qwen35moe-tiny.gguf")).unwrap();
    let key = b"qwen35moe.block_count";
    // The key's bytes, then its value type (u32) and the u32 value.
    let at = original.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    assert_eq!(u32::from_le_bytes(original[at..at + 4].try_into().unwrap()), 5, "4 layers + 1 MTP as written");
    for (value, want) in [
        (u32::MAX, "GGUF key `qwen35moe.block_count`: 4294967295 is absurdly large"),
        (1000, "GGUF key `qwen35moe.block_count`: 1000 blocks, but the file has only 80 tensors"),
        (1, "GGUF key `qwen35moe.nextn_predict_layers`: 1 MTP blocks leave no layers of 1"),
        (6, "tensor `blk.4.nextn.eh_proj.weight` (FILE): unexpected in a GatedDeltaNet layer of qwen3_5_moe"),
    ] {
        let mut bytes = original.clone();
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let e = GgufModel::open(&path).unwrap_err().to_string();
        let want = want.replace("FILE", &path.display().to_string());
        assert!(e.contains(&want), "block_count {value}: {e}");
    }
}

/// A tokenizer.json beside the .gguf is the tokenizer; without one and without a vocabulary in
/// the metadata, the error says both are missing.
#[test]
fn tokenizer_json_beside_the_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.gguf");
    std::fs::copy(testdata("gguf/qwen35moe-tiny.gguf"), &model).unwrap();
    let m = GgufModel::open(&model).unwrap();
    let e = m.tokenizer().unwrap_err().to_string();
    assert!(e.contains("no `tokenizer.ggml.model` in the metadata and no tokenizer.json beside the file"), "{e}");
    let mut json = Vec::new();
    let gz = std::fs::File::open(testdata("text/qwen3-tokenizer.json.gz")).unwrap();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut json).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), &json).unwrap();
    let tok = m.tokenizer().unwrap();
    let reference = flashmoe_text::TextTokenizer::from_bytes(&json).unwrap();
    assert_eq!(tok.vocab_size(), reference.vocab_size());
    assert_eq!(tok.encode(TEXTS[0], false).unwrap(), reference.encode(TEXTS[0], false).unwrap());
}

/// scripts/bench/gguf_synth.py (random GGUFs at real geometries for GPU benchmarks) writes, through
/// gguf-py's GGUFWriter, a model this reader opens at the geometry asked for, with every matrix in
/// the type asked for and weights that dequantize to finite values of a trained model's spread.
#[test]
fn bench_synth_gguf_opens_with_finite_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    run_python(
        &testdata("../scripts/bench/gguf_synth.py"),
        ["--geometry", "tiny", "--layers", "4", "--type", "IQ4_NL", "--out", out.to_str().unwrap()],
    );
    assert!(dir.path().join("tokenizer.json").exists());
    let m = GgufModel::open(&out).unwrap();
    let c = &m.config;
    // peer.py's "tiny" geometry: hidden 64, 4 layers, 4 heads, 4 linear value heads, 16 experts,
    // top-4, expert intermediate 64.
    assert_eq!(
        (c.hidden_size, c.num_layers, c.num_heads, c.linear_value_heads, c.num_experts, c.experts_per_token),
        (64, 4, 4, 4, 16, 4)
    );
    assert_eq!((c.moe_intermediate, c.shared_intermediate, c.vocab_size), (64, 64, 248_320));
    let full: Vec<usize> = (0..c.num_layers).filter(|&i| c.layer_kinds[i] == LayerKind::FullAttention).collect();
    assert_eq!(full, vec![3]);
    let ty = flashmoe_kernels::ggml::GgmlType::IQ4_NL;
    let matrices: Vec<&flashmoe::gguf::MappedTensor> = m
        .tensors
        .globals
        .iter()
        .chain(m.tensors.layers.iter().flatten())
        .filter(|t| {
            t.gguf_name.ends_with(".weight")
                && t.dims.len() == 2
                && !t.gguf_name.contains("gate_inp")
                && !t.gguf_name.contains("conv1d")
        })
        .collect();
    assert!(matrices.len() > 30, "{} matrices", matrices.len());
    for t in &matrices {
        assert_eq!(t.ggml_type, ty, "{}", t.gguf_name);
    }
    for layer in &m.tensors.experts {
        let LayerExperts::Separate { gate, up, down } = layer else { panic!("fused gate_up") };
        for s in [gate, up, down] {
            assert_eq!(s.ggml_type, ty, "{}", s.tensor);
            // The last expert's rows, dequantized: finite, spread 0.005–0.2, about centred (IQ4_NL's
            // levels average −5.9 against a spread of ≈ 67: mean ≈ −0.09·sd).
            let bytes = m.bytes(s.range(s.experts - 1));
            let mut w = vec![0f32; (s.rows * s.cols) as usize];
            let rb = ty.row_bytes(s.cols as usize).unwrap();
            for (row, o) in bytes.as_slice().chunks_exact(rb).zip(w.chunks_exact_mut(s.cols as usize)) {
                flashmoe_kernels::ggml::dequantize_row(ty, row, o).unwrap();
            }
            let n = w.len() as f64;
            let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
            let sd = (w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            assert!(w.iter().all(|v| v.is_finite()), "{}", s.tensor);
            assert!(mean.abs() < 0.25 * sd && (0.005..0.2).contains(&sd), "{}: mean {mean}, sd {sd}", s.tensor);
        }
    }
}
