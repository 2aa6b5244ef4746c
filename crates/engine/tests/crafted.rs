//! Crafted model folders (issue 13, class 6): non-regular files where a file is expected,
//! absurd sizes, offsets and counts, names that leave the folder. Each is a one-line error
//! naming the file, returned at once: no hang, no panic, no huge allocation.

use flashmoe::generate::Engine;
use flashmoe::packed::Manifest;
use flashmoe::{Model, ModelConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models").join(name)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn mkfifo(path: &Path) {
    std::fs::remove_file(path).ok();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// Runs `f` on another thread and fails the test if it does not return within 20 s (a FIFO
/// opened for reading blocks until a writer comes; none will).
fn within_20s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()).ok());
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{what}: no answer in 20 s (hang)"))
}

#[test]
fn a_fifo_where_a_file_is_expected_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"] {
        let dir = tmp.path().join(file);
        copy_dir(&fixture("qwen35-moe-tiny"), &dir);
        mkfifo(&dir.join(file));
        let e = within_20s(file, move || Engine::load(&dir).err().expect("refused").to_string());
        assert!(e.contains(file) && e.contains("is a FIFO, not a regular file"), "{file}: {e}");
    }
    // A FIFO as a shard the index names, and as a chat template (no silent fall back to ChatML).
    let dir = tmp.path().join("shard");
    copy_dir(&fixture("qwen35-moe-tiny"), &dir);
    mkfifo(&dir.join("model-00002-of-00002.safetensors"));
    let e = within_20s("shard", move || Model::load(&dir).err().expect("refused").to_string());
    assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("FIFO"), "{e}");
    let dir = tmp.path().join("template");
    copy_dir(&fixture("qwen35-moe-tiny"), &dir);
    mkfifo(&dir.join("chat_template.jinja"));
    let e = within_20s("template", move || Engine::load(&dir).err().expect("refused").to_string());
    assert!(e.contains("chat_template.jinja") && e.contains("FIFO"), "{e}");
}

#[test]
fn a_device_where_a_file_is_expected_is_refused_not_read_for_ever() {
    let tmp = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json", "generation_config.json"] {
        let dir = tmp.path().join(file);
        copy_dir(&fixture("qwen35-moe-tiny"), &dir);
        std::fs::remove_file(dir.join(file)).ok();
        std::os::unix::fs::symlink("/dev/zero", dir.join(file)).unwrap();
        let e = within_20s(file, move || Engine::load(&dir).err().expect("refused").to_string());
        assert!(e.contains(file) && e.contains("is a device, not a regular file"), "{file}: {e}");
    }
}

#[test]
fn index_entries_outside_the_model_folder_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["../elsewhere.safetensors", "/etc/passwd", ""] {
        let dir = tmp.path().join("m");
        copy_dir(&fixture("qwen35-moe-tiny"), &dir);
        let p = dir.join("model.safetensors.index.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["weight_map"]["model.norm.weight"] = name.into();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = Model::load(&dir).err().expect("refused").to_string();
        assert!(e.contains("not a file inside the model folder") && e.contains("model.norm.weight"), "{name}: {e}");
    }
}

#[test]
fn absurd_config_sizes_are_refused_before_any_allocation() {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen35-moe-tiny/config.json")).unwrap()).unwrap();
    let path = Path::new("config.json");
    for (field, value) in [
        ("num_hidden_layers", 1u64 << 60),
        ("head_dim", (1u64 << 63) - 1),
        ("hidden_size", 1 << 40),
        ("num_experts", 1 << 40),
        ("vocab_size", 1 << 62),
        ("linear_key_head_dim", 1 << 62),
    ] {
        let mut c = cfg.clone();
        c["text_config"][field] = value.into();
        if field == "num_hidden_layers" {
            c["text_config"].as_object_mut().unwrap().remove("layer_types");
        }
        let t0 = Instant::now();
        let e = ModelConfig::from_value(&c, path).expect_err("refused").to_string();
        assert!(e.contains(field) && e.contains("supported"), "{field}: {e}");
        assert!(t0.elapsed() < Duration::from_secs(1), "{field}: took {:?}", t0.elapsed());
    }
    // An eos id beyond u32 is refused, not truncated to another token.
    let mut c = cfg.clone();
    c["text_config"]["eos_token_id"] = (1u64 << 32 | 7).into();
    c["eos_token_id"] = (1u64 << 32 | 7).into();
    let e = ModelConfig::from_value(&c, path).expect_err("refused").to_string();
    assert!(e.contains("eos_token_id"), "{e}");
}

/// A real manifest (the packed tiny model's), edited one field at a time.
#[test]
fn manifest_offsets_sizes_and_names_are_checked() {
    use flashmoe::convert::{ConvertOptions, Target, convert};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("packed");
    let keep = ConvertOptions { expert: Target::Keep, other: Target::Keep, ..ConvertOptions::default() };
    convert(&fixture("qwen35-moe-tiny"), &out, &keep, &()).unwrap();
    let text = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    let path = out.join("manifest.json");
    Manifest::parse(&text, &path).expect("the converter's own manifest parses");
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("stride × experts overflows", Box::new(|m| m["experts"][0]["stride"] = (1u64 << 62).into()), "too large"),
        ("unaligned stride", Box::new(|m| m["experts"][0]["stride"] = 4097.into()), "multiple of 4096"),
        ("blob beyond stride", Box::new(|m| m["experts"][0]["blob_bytes"] = (1u64 << 40).into()), "exceeds its stride"),
        (
            "component past the blob",
            Box::new(|m| m["experts"][0]["components"][0]["offset"] = u64::MAX.into()),
            "outside the",
        ),
        ("checksums missing", Box::new(|m| m["experts"][0]["xxh3"] = serde_json::json!([])), "checksums for"),
        ("offset overflow", Box::new(|m| m["tensors"][0]["offset"] = u64::MAX.into()), "overflows"),
        ("expert file outside", Box::new(|m| m["experts"][0]["file"] = "../../etc/passwd".into()), "inside the model"),
        ("absolute weights file", Box::new(|m| m["weights_file"] = "/dev/zero".into()), "inside the model"),
    ];
    for (what, edit, want) in cases {
        let mut m = base.clone();
        edit(&mut m);
        let e = Manifest::parse(&m.to_string(), &path).err().unwrap_or_else(|| panic!("{what}: accepted")).to_string();
        assert!(e.contains(want) && e.contains("manifest.json"), "{what}: {e}");
    }
    // Through the loader: a tensor whose end wraps around 2^64 is an error, not a view.
    let mut m = base.clone();
    m["tensors"][0]["offset"] = (u64::MAX - 8).into();
    m["tensors"][0]["nbytes"] = 8.into();
    std::fs::write(&path, m.to_string()).unwrap();
    let e = Model::load(&out).err().expect("refused").to_string();
    assert!(e.contains("weights.bin") && e.contains("truncated"), "{e}");
}
