//! `flashmoe synth`: random-weight packed models with the real dimensions. The output passes
//! `verify`, loads and runs, is byte-identical for the same seed, has exactly the layout
//! `convert` writes, respects `--layers`, and `--routing-like` shapes routing to a profile.

use flashmoe::convert::{ConvertOptions, Target, convert};
use flashmoe::packed::Manifest;
use flashmoe::packed::verify::verify;
use flashmoe::{LogitsFor, Model, ModelConfig};
use flashmoe_tools::synth::{Geometry, SynthOptions, synth};
use std::path::{Path, PathBuf};

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
}

fn opts(out: &Path) -> SynthOptions {
    SynthOptions { geometry: Geometry::Tiny, out: out.to_path_buf(), ..SynthOptions::default() }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for sub in ["", "experts"] {
        let mut names: Vec<_> =
            std::fs::read_dir(dir.join(sub)).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        names.sort();
        for p in names {
            v.push((p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    v
}

const IDS: [u32; 6] = [1, 5, 77, 300, 12, 511];

#[test]
fn tiny_synth_verifies_loads_and_gives_finite_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("tiny");
    let rep = synth(&opts(&dst), &()).unwrap();
    assert!(rep.routing.is_empty());
    let total = rep.non_expert_bytes + rep.expert_bytes;
    assert!(total < 8 << 20, "a tiny synth is a few MB, got {total}");
    let v = verify(&dst).unwrap();
    assert_eq!(v.experts, 8 * 16);
    let man = Manifest::load(&dst).unwrap();
    assert!(man.experts.iter().all(|e| e.stride % 4096 == 0 && e.num_experts == 16));
    assert!(man.tensors.iter().all(|t| t.offset % 4096 == 0));
    assert!(!dst.with_file_name("tiny.partial").exists());

    let m = Model::load(&dst).unwrap();
    assert_eq!(m.config.num_layers, 8);
    let mut st = m.new_state();
    let mut out = m.forward(&IDS[..4], &mut st, LogitsFor::All).unwrap();
    for &id in &IDS[4..] {
        out.extend(m.forward(&[id], &mut st, LogitsFor::Last).unwrap());
    }
    assert_eq!(out.len(), IDS.len() * 512);
    assert!(out.iter().all(|x| x.is_finite()), "non-finite logits");
    // Activations stay O(1): logits neither vanish nor explode.
    let rms = (out.iter().map(|x| x * x).sum::<f32>() / out.len() as f32).sqrt();
    assert!(rms > 0.05 && rms < 100.0, "logit rms {rms}");
}

#[test]
fn synth_layout_is_exactly_what_convert_writes() {
    // Converting the synth model with `keep` re-packs it through the engine's own writer: the
    // tensor table, blob components and strides must come out the same.
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    synth(&opts(&a), &()).unwrap();
    let b = tmp.path().join("b");
    let keep = ConvertOptions { expert: Target::Keep, other: Target::Keep, ..ConvertOptions::default() };
    convert(&a, &b, &keep, &()).unwrap();
    let (ma, mb) = (Manifest::load(&a).unwrap(), Manifest::load(&b).unwrap());
    let table = |m: &Manifest| {
        m.tensors
            .iter()
            .map(|t| {
                (t.name.clone(), t.dtype.clone(), t.shape.clone(), t.offset, t.nbytes, t.quant.clone(), t.xxh3.clone())
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(table(&ma), table(&mb));
    for (x, y) in ma.experts.iter().zip(&mb.experts) {
        assert_eq!(
            (x.layer, &x.file, x.num_experts, x.stride, x.blob_bytes),
            (y.layer, &y.file, y.num_experts, y.stride, y.blob_bytes)
        );
        assert_eq!(serde_json::to_value(&x.components).unwrap(), serde_json::to_value(&y.components).unwrap());
        assert_eq!(x.xxh3, y.xxh3, "same expert bytes after re-packing");
    }
    assert_eq!(std::fs::read(a.join("weights.bin")).unwrap(), std::fs::read(b.join("weights.bin")).unwrap());
}

#[test]
fn same_seed_gives_identical_files_and_another_seed_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let prof = repo("testdata/routing/qwen3.5-35b-expert-activation-profile.json");
    let with = |out: &Path, seed| SynthOptions { seed, routing_like: Some(prof.clone()), sim_tokens: 256, ..opts(out) };
    synth(&with(&a, 7), &()).unwrap();
    synth(&with(&b, 7), &()).unwrap();
    synth(&with(&c, 8), &()).unwrap();
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(fa.len(), 3 + 8, "manifest, config, weights and 8 expert files");
    for (x, y) in fa.iter().zip(&fb) {
        assert!(x == y, "{} differs between two runs with the same seed", x.0);
    }
    let differ = |name: &str| fa.iter().find(|f| f.0 == name).unwrap().1 != fc.iter().find(|f| f.0 == name).unwrap().1;
    assert!(differ("weights.bin") && differ("experts/layer_003.bin"));
}

#[test]
fn layers_option_is_respected() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("two");
    synth(&SynthOptions { layers: Some(2), expert_bits: 2, bits: 8, ..opts(&dst) }, &()).unwrap();
    let man = Manifest::load(&dst).unwrap();
    assert_eq!(man.experts.len(), 2);
    assert_eq!(man.config["num_hidden_layers"], 2);
    assert_eq!(man.config["layer_types"].as_array().unwrap().len(), 2);
    assert!(!man.tensors.iter().any(|t| t.name.starts_with("model.layers.2.")));
    let gate = man.experts[0].components.iter().find(|c| c.name == "gate_proj.weight").unwrap();
    assert_eq!(gate.quant.as_ref().unwrap().bits, 2);
    let q = man.tensors.iter().find(|t| t.name == "model.layers.0.linear_attn.in_proj_z.weight").unwrap();
    assert_eq!(q.quant.as_ref().unwrap().bits, 8);
    verify(&dst).unwrap();
    let m = Model::load(&dst).unwrap();
    let mut st = m.new_state();
    assert!(m.forward(&[3, 4], &mut st, LogitsFor::Last).unwrap().iter().all(|x| x.is_finite()));

    let e = synth(&SynthOptions { layers: Some(9), ..opts(&tmp.path().join("x")) }, &()).unwrap_err();
    assert!(e.to_string().contains("--layers 9"), "{e}");
    // An existing destination is not replaced without force.
    let e = synth(&SynthOptions { layers: Some(1), ..opts(&dst) }, &()).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    synth(&SynthOptions { layers: Some(1), force: true, ..opts(&dst) }, &()).unwrap();
    assert_eq!(Manifest::load(&dst).unwrap().experts.len(), 1);
}

#[test]
fn routers_are_always_8_bit_and_norms_effective() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("t");
    synth(&opts(&dst), &()).unwrap();
    let man = Manifest::load(&dst).unwrap();
    for n in ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"] {
        assert_eq!(man.tensors.iter().find(|t| t.name == n).unwrap().quant.as_ref().unwrap().bits, 8, "{n}");
    }
    let m = Model::load(&dst).unwrap();
    let l = &m.host_weights::<flashmoe::qwen35::ModelWeights>().unwrap().layers[0];
    assert!(l.input_norm.iter().all(|&x| (0.9..1.1).contains(&x)));
}

#[test]
fn routing_like_matches_profile_gini_in_simulation() {
    let tmp = tempfile::tempdir().unwrap();
    let prof_path = repo("testdata/routing/qwen3.5-35b-expert-activation-profile.json");
    let dst = tmp.path().join("r");
    let o = SynthOptions {
        experts: Some(64),
        top_k: Some(4),
        layers: Some(4),
        routing_like: Some(prof_path.clone()),
        ..opts(&dst)
    };
    let rep = synth(&o, &()).unwrap();
    assert_eq!(rep.routing.len(), 4);
    let prof = flashmoe_tools::routing_stats::load_profile(&prof_path).unwrap();
    for f in &rep.routing {
        // The profile is deeper than the model: layer l is shaped like profile layer l.
        assert_eq!(f.profile_layer, f.layer);
        assert_eq!(f.target_gini, prof[f.profile_layer].gini);
        assert!((f.achieved_gini - f.target_gini).abs() <= 0.05, "{f:?}");
        assert!(f.spread > 0.0 && f.achieved_top20 > 0.2, "{f:?}");
    }
    verify(&dst).unwrap();
    let m = Model::load(&dst).unwrap();
    let mut st = m.new_state();
    assert!(m.forward(&[3, 4, 5], &mut st, LogitsFor::Last).unwrap().iter().all(|x| x.is_finite()));

    // The skew is real: the routers' per-expert row scales now differ.
    let man = Manifest::load(&dst).unwrap();
    let t = man.tensors.iter().find(|t| t.name == "model.layers.0.mlp.gate.scales").unwrap();
    let bytes = std::fs::read(dst.join("weights.bin")).unwrap();
    let s = &bytes[t.offset as usize..(t.offset + t.nbytes) as usize];
    let row = t.shape[1] * 2;
    assert_ne!(s[..row], s[row..2 * row]);
}

#[test]
fn real_geometry_configs_have_the_spec_dimensions() {
    // (geometry, hidden, layers, heads, linear value heads, experts, top-k, intermediate, vocab)
    let want = [
        (Geometry::Qwen35_397bA17b, 4096, 60, 32, 64, 512, 10, 1024, 248_320),
        (Geometry::Qwen35_122bA10b, 3072, 48, 32, 64, 256, 8, 1024, 248_320),
        (Geometry::Qwen35_35bA3b, 2048, 40, 16, 32, 256, 8, 512, 248_320),
        (Geometry::Qwen3Next80bA3b, 2048, 48, 16, 32, 512, 10, 512, 151_936),
    ];
    for (g, h, l, nh, hv, e, k, i, v) in want {
        let cfg = ModelConfig::from_value(&g.config_json(None), Path::new("synth")).unwrap();
        assert_eq!((cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.linear_value_heads), (h, l, nh, hv), "{g}");
        assert_eq!(
            (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate, cfg.shared_intermediate),
            (e, k, i, i)
        );
        assert_eq!((cfg.vocab_size, cfg.num_kv_heads, cfg.head_dim), (v, 2, 256));
        assert_eq!(
            (cfg.linear_key_heads, cfg.linear_key_dim, cfg.linear_value_dim, cfg.conv_kernel),
            (16, 128, 128, 4)
        );
        assert_eq!(cfg.rope_theta, 1e7);
        assert_eq!(cfg.rotary_dims(), 64);
        assert!(!cfg.tie_word_embeddings);
        let full: Vec<usize> =
            (0..l).filter(|&x| cfg.layer_kinds[x] == flashmoe::config::LayerKind::FullAttention).collect();
        assert_eq!(full.len(), l / 4, "{g}: 1 full-attention layer in 4");
        assert!(full.iter().all(|x| x % 4 == 3));
        // --layers keeps the first N layers of the same pattern.
        let c5 = ModelConfig::from_value(&g.config_json(Some(5)), Path::new("synth")).unwrap();
        assert_eq!(c5.num_layers, 5);
        assert_eq!(&c5.layer_kinds[..], &cfg.layer_kinds[..5]);
    }
    assert_eq!(Geometry::Qwen3Next80bA3b.config_json(None)["model_type"], "qwen3_next");
    assert_eq!(Geometry::Qwen35_35bA3b.config_json(None)["model_type"], "qwen3_5_moe_text");
    // Spec §2.3: bytes per expert at 4-bit / group 64.
    for (g, bytes) in [
        (Geometry::Qwen35_397bA17b, 7_077_888),
        (Geometry::Qwen35_122bA10b, 5_308_416),
        (Geometry::Qwen35_35bA3b, 1_769_472),
    ] {
        let (blob, stride) = flashmoe_tools::synth::expert_blob(&g.config(None).unwrap(), 4, 64);
        assert_eq!(blob, bytes, "{g}");
        assert_eq!(stride % 4096, 0);
    }
    assert_eq!("qwen3.5-35b-a3b".parse::<Geometry>().unwrap(), Geometry::Qwen35_35bA3b);
    assert!("qwen3.5-1t".parse::<Geometry>().is_err());
}

#[test]
fn tokenizer_is_copied_only_when_it_fits_the_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = repo("testdata/models/qwen35-moe-tiny");
    let dst = tmp.path().join("tok");
    let rep = synth(&SynthOptions { tokenizer_from: Some(tok.clone()), layers: Some(1), ..opts(&dst) }, &()).unwrap();
    assert!(rep.copied_files.contains(&"tokenizer.json".to_string()));
    assert!(dst.join("tokenizer.json").exists());
    assert_eq!(Manifest::load(&dst).unwrap().copied_files, rep.copied_files);
    let e = synth(
        &SynthOptions {
            tokenizer_from: Some(tok),
            vocab: Some(100),
            layers: Some(1),
            ..opts(&tmp.path().join("small"))
        },
        &(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("beyond the model's vocabulary of 100"), "{e}");
}
