//! Bad numbers and mismatched configs are errors that say where, never fluent garbage: NaN
//! weights, impossible config values, a config naming fewer layers than the checkpoint holds.

use flashmoe::{LogitsFor, Model};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models").join(name)
}

/// A copy of the flat fixture (one safetensors file, layer kinds from full_attention_interval).
fn copy_flat(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(fixture("qwen35-moe-tiny-flat")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Byte offset of tensor `name`'s data in a safetensors file.
fn data_offset(file: &Path, name: &str) -> u64 {
    let mut f = std::fs::File::open(file).unwrap();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let n = u64::from_le_bytes(len);
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).unwrap();
    let h: serde_json::Value = serde_json::from_slice(&header).unwrap();
    8 + n + h[name]["data_offsets"][0].as_u64().unwrap()
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let p = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(&p, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

#[test]
fn nan_weight_is_an_error_naming_its_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_flat(&dir);
    let file = dir.join("model.safetensors");
    let at = data_offset(&file, "model.layers.1.mlp.shared_expert.down_proj.weight");
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&f32::NAN.to_le_bytes()).unwrap();
    drop(f);
    let m = Model::load(&dir).unwrap();
    for want in [LogitsFor::Last, LogitsFor::None] {
        let mut st = m.new_state();
        let e = m.forward(&[1, 2, 3], &mut st, want).unwrap_err().to_string();
        assert!(e.contains("layer 1") && e.contains("non-finite"), "{e}");
    }
}

#[test]
fn impossible_config_values_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (key, value, field) in [
        ("rms_norm_eps", serde_json::json!(0.0), "rms_norm_eps"),
        ("rms_norm_eps", serde_json::json!(-1e-6), "rms_norm_eps"),
        ("rope_theta", serde_json::json!(-5.0), "rope_theta"),
    ] {
        let dir = tmp.path().join(format!("{key}-{value}"));
        copy_flat(&dir);
        edit_config(&dir, key, value);
        let e = Model::load(&dir).err().expect("refused").to_string();
        assert!(e.contains(field) && e.contains("config.json"), "{e}");
    }
}

#[test]
fn config_with_fewer_layers_than_the_checkpoint_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_flat(&dir);
    edit_config(&dir, "num_hidden_layers", serde_json::json!(4));
    let e = Model::load(&dir).err().expect("refused").to_string();
    assert!(e.contains("layer 7") && e.contains("num_hidden_layers is 4"), "{e}");
}

/// `convert --force` never deletes the source or anything that is not a flashmoe output.
#[test]
fn convert_force_replaces_only_flashmoe_outputs() {
    use flashmoe::convert::{ConvertOptions, Target, convert};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("models");
    let src = root.join("tiny");
    copy_flat(&src);
    let keep = ConvertOptions { expert: Target::Keep, other: Target::Keep, force: true, ..ConvertOptions::default() };
    // The folder that holds the source: refused, the source and its sibling stay.
    std::fs::write(root.join("sibling.txt"), "keep me").unwrap();
    let err = convert(&src, &root, &keep, &()).unwrap_err().to_string();
    assert!(err.contains("would delete the source"), "{err}");
    assert!(src.join("config.json").exists() && root.join("sibling.txt").exists());
    // The source itself.
    let err = convert(&src, &src, &keep, &()).unwrap_err().to_string();
    assert!(err.contains("is the source folder"), "{err}");
    // A folder of someone else's files.
    let other = tmp.path().join("photos");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("a.jpg"), "x").unwrap();
    let err = convert(&src, &other, &keep, &()).unwrap_err().to_string();
    assert!(err.contains("not a flashmoe packed model"), "{err}");
    assert!(other.join("a.jpg").exists());
    // A file.
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "x").unwrap();
    assert!(convert(&src, &file, &keep, &()).is_err());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    // A flashmoe output is replaced; without --force it is refused.
    let out = tmp.path().join("packed");
    convert(&src, &out, &keep, &()).unwrap();
    convert(&src, &out, &keep, &()).unwrap();
    let no_force = ConvertOptions { force: false, ..keep };
    let err = convert(&src, &out, &no_force, &()).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
}
